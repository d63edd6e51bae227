"""What the tests share, fixtures aside (those are in conftest.py): DeepSpeed and ZO settings, tiny models,
batches, launching the CLI and real DeepSpeed ranks, the single-process reference, comparisons, and
readers for what a run writes.

Test modules import this module, never each other. The tests/dist workers import it too (they are
launched as scripts and put tests/ on sys.path first).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DIST = REPO / "tests" / "dist"  # the rank workers

# -- settings ------------------------------------------------------------------------------------------

# Partition mode (each rank edits its partition in place): the reference the perturb-on-read tests
# (test_perturb.py) compare zo.perturb=forward against, at every layout.
ZO = {"lr": 1e-4, "eps": 1e-3, "weight_decay": 0.1, "perturb": "partition"}
FORWARD = {**ZO, "perturb": "forward"}
# The eager kernel (compile=False) computes the same integer z stream as the compiled one. It is the
# cheaper choice where a launch builds several engines (each would pay torch.compile's tracing again)
# and the partitions are tiny.
ZO_EAGER = {**ZO, "compile": False}


def z3(**zero) -> dict:
    """A ZeRO-3 ds_config (micro batch 1) with ``zero`` added to its zero_optimization block."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **zero}}


Z3 = z3()  # default persistence threshold: small parameters (and adapters) stay whole on every rank
Z3_T0 = z3(stage3_param_persistence_threshold=0)
Z3_OFF = z3(offload_param={"device": "cpu", "pin_memory": True})
Z0 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
Z3_BF16 = {**z3(), "bf16": {"enabled": True}}


def z3_nvme(swap_dir: Path) -> dict:
    """ZeRO-3 with offload_param nvme into ``swap_dir``: small swap buffers (4 x 5 M elements), so a tiny model's
    large parameters are swapped in and out in batches; one aio thread."""
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(swap_dir),
                                                                "pin_memory": False, "buffer_count": 4,
                                                                "buffer_size": 5_000_000}},
            "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True,
                    "thread_count": 1}}


def shipped_ds(name: str) -> dict:
    """ds_configs/<name>.json, loaded by the library's loader."""
    from zo_deepspeed.ds_config import load_ds_config

    return load_ds_config(REPO / "ds_configs" / f"{name}.json")


def filled_ds(name: str, world: int = 2, gpus_per_node: int = 2, nvme_path: str = "/nvme/zo",
              micro_batch: int = 1) -> dict:
    """A shipped ds_config with its "auto" values filled as the trainer fills them."""
    from zo_deepspeed.ds_config import fill_auto

    return fill_auto(shipped_ds(name), micro_batch=micro_batch, grad_accum=1, world_size=world,
                     gpus_per_node=gpus_per_node, nvme_path=nvme_path)


# -- tiny models and data ----------------------------------------------------------------------------

TINY = {
    # sizes chosen so several matrices exceed the default persistence threshold
    # (1e5 elements) and most are not multiples of 3 (padding at W=3)
    "llama": dict(vocab_size=1000, hidden_size=104, intermediate_size=1000, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True),
    "opt": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                max_position_embeddings=64, word_embed_proj_dim=32),
}


def tiny_model(kind: str = "llama", seed: int = 0, save_to: Path | None = None, like: Path | None = None,
               **config):
    """A tiny random HF causal LM (``kind`` llama or opt), its weights drawn after torch.manual_seed(seed).

    The config is TINY[kind] with ``config`` on top, or with ``like`` the config of that saved model with
    ``config`` on top. ``save_to``: also saved there (save_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "opt": (OPTConfig, OPTForCausalLM)}[kind]
    if like is not None:
        cfg = cfg_cls.from_pretrained(like)
        for k, v in config.items():
            setattr(cfg, k, v)
    else:
        cfg = cfg_cls(**{**TINY[kind], **config})
    torch.manual_seed(seed)  # test code, not library code
    m = model_cls(cfg)
    if save_to is not None:
        m.save_pretrained(save_to)
    return m


def tiny_llama(seed: int = 0, **kw):
    return tiny_model("llama", seed, **kw)


def tiny_opt(seed: int = 0, **kw):
    return tiny_model("opt", seed, **kw)


def make_batches(vocab: int, n_steps: int = 4, batch: int = 6, seq: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, : seq // 4] = -100  # prompt positions carry no loss
        out.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))
    return out


def save_batches(path: Path, vocab: int, **kw) -> list[dict]:
    """make_batches(vocab, **kw), saved to ``path`` for the rank workers; returns the batches."""
    batches = make_batches(vocab, **kw)
    torch.save(batches, path)
    return batches


def write_jsonl(path, rows):
    """One JSON object per line (a task's data file); returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- processes -----------------------------------------------------------------------------------------

def repo_env(**extra) -> dict:
    """This environment with this checkout first on PYTHONPATH, and ``extra`` on top."""
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(world: int, port: int, *entry: str) -> list[str]:
    """The deepspeed launcher on this machine: ``world`` local ranks running ``entry``."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port", str(port),
            *entry]


def tail(p: subprocess.CompletedProcess, n: int = 5000) -> str:
    """The end of a finished process's stdout and stderr, for a failure message."""
    return f"{p.stdout[-n:]}\n{p.stderr[-n:]}"


def run_cli(args: list[str], world: int = 1, cwd=None, timeout: int = 900, check: bool = True,
            env: dict | None = None):
    """``zo-deepspeed`` as a user runs it: plain python (world 1) or the deepspeed launcher.
    ``env``: extra environment variables (e.g. ZO_DEEPSPEED_FAULT for the crash tests)."""
    threads = "1" if world > 1 else os.environ.get("OMP_NUM_THREADS", "2")
    env = repo_env(**{"OMP_NUM_THREADS": threads, **(env or {})})
    if world == 1:
        cmd = [sys.executable, "-m", "zo_deepspeed", *args]
    else:
        cmd = deepspeed_cmd(world, free_port(), "--module", "zo_deepspeed", *args)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{tail(p)}")
    return p


def scenario(name, model_dir, ds, zo, batches_file, tmp_path, **kw) -> dict:
    """One scenario of a worker's spec: train ``model_dir`` under ds_config ``ds`` on the saved batches, write
    tmp_path/name.{json,safetensors,traj.jsonl}. ``kw``: dtype, micro (run_zo.py), adapter (run_adapters.py)."""
    return dict(name=name, model_dir=str(model_dir), ds_config=ds, zo=zo, batches=str(batches_file),
                out=str(tmp_path / name), **kw)


def write_spec(path: Path, scenarios: list[dict]) -> Path:
    """The --spec file of a tests/dist worker."""
    path.write_text(json.dumps({"scenarios": scenarios}))
    return path


def launch_ranks(world: int, scenarios: list[dict], workdir: Path, timeout: int = 900,
                 worker: str = "run_zo.py") -> None:
    """Run tests/dist/<worker> (default run_zo.py) on `world` real DeepSpeed ranks via the deepspeed launcher."""
    spec = write_spec(workdir / f"spec_w{world}.json", scenarios)
    port = free_port()
    p = subprocess.run(deepspeed_cmd(world, port, str(DIST / worker), "--spec", str(spec)),
                       env=repo_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=timeout, cwd=workdir)
    if p.returncode != 0:
        raise AssertionError(f"deepspeed launch failed ({p.returncode}):\n{tail(p, 6000)}")
    # zo_deepspeed.initialize unlinks DeepSpeed's CPU shm all-reduce buffers (which DeepSpeed leaks):
    # none of this launch's may remain in /dev/shm
    leaked = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for f in leaked:
        f.unlink(missing_ok=True)
    assert not leaked, f"leaked DeepSpeed shm buffers: {[f.name for f in leaked]}"


# -- the rank workers' side --------------------------------------------------------------------------

def worker_main(run) -> None:
    """Entry of a tests/dist worker: ``--spec FILE`` (see write_spec); ``run(scenario)`` for each scenario."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    for sc in json.loads(Path(args.spec).read_text())["scenarios"]:
        run(sc)


def step_row(r) -> dict:
    """What a worker records of one step (a StepResult) for compare(), and its profile's counters."""
    return {"loss_plus": r.loss_plus, "loss_minus": r.loss_minus, "g": list(r.g), "edited": r.profile.edited,
            "gathered_bytes": r.profile.gathered_bytes}


def save_weights(sd: dict, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(path))


# -- single-process reference and comparisons ---------------------------------------------------------

def reference_engine(model_dir, zo: dict, batches, dtype=torch.float32, shards: int | None = None, micro: int = 1,
                     threads: int | None = None, adapter: dict | None = None):
    """Plain single-process run (no DeepSpeed); returns (step results, the flushed engine).

    ``shards``: feed the ranks' shards as micro-batches so that forward shapes (and so low-precision
    rounding) match the distributed run exactly. ``threads``: torch threads for the run (1: the eager
    kernel's many small ops slow down by 10x on a shared 2-core machine when they try to use both cores).
    ``adapter``: an AdapterConfig's fields, the adapter built on the loaded model."""
    import zo_deepspeed as zd
    from transformers import AutoModelForCausalLM

    n_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        if adapter is not None:
            from zo_deepspeed.adapters import AdapterConfig, adapt

            m = adapt(m, AdapterConfig(**adapter))
        eng = zd.initialize(m, None, zd.ZOConfig(**zo))
        out = []
        for b in batches:
            n = b["input_ids"].shape[0]
            if shards:
                parts = []
                for idx in torch.tensor_split(torch.arange(n), shards):
                    parts += [{k: v[idx[i]] for k, v in b.items()}
                              for i in torch.tensor_split(torch.arange(len(idx)), micro)]
                r = eng.step(parts)
            else:
                r = eng.step(b)
            out.append(r)
        eng.flush()
        return out, eng
    finally:
        if threads:
            torch.set_num_threads(n_threads)


def reference(model_dir, zo: dict, batches, **kw):
    """reference_engine's step results and final weights (fp32 copies), the arguments of compare()."""
    out, eng = reference_engine(model_dir, zo, batches, **kw)
    return out, {k: v.detach().float() for k, v in eng.module.named_parameters()}


def worker_result(out_prefix) -> dict:
    """What a worker wrote to <out_prefix>.json (steps, kind, world, ...)."""
    return json.loads(Path(f"{out_prefix}.json").read_text())


def worker_weights(out_prefix) -> dict:
    """The gathered final weights a worker wrote to <out_prefix>.safetensors."""
    from safetensors.torch import load_file

    return load_file(f"{out_prefix}.safetensors")


def compare_steps(got_steps, ref_steps, rel: float = 1e-6, minus: bool = True, g: bool = True, what=None):
    """Step by step, a worker's recorded losses (and g) equal the reference's StepResults."""
    for r, d in zip(ref_steps, got_steps, strict=True):
        assert d["loss_plus"] == pytest.approx(r.loss_plus, rel=rel), what
        if minus:
            assert d["loss_minus"] == pytest.approx(r.loss_minus, rel=rel), what
        if g:
            assert d["g"] == pytest.approx(list(r.g), rel=1e-3, abs=1e-6), what


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| / ||b|| (the denominator at least ``floor``)."""
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def compare(out_prefix, ref_steps, ref_weights, loss_rtol=1e-6, w_rtol=1e-6) -> dict:
    """A worker's run equals the reference: losses, g, and every final weight; returns its result."""
    got = worker_result(out_prefix)
    compare_steps(got["steps"], ref_steps, rel=loss_rtol)
    sd = worker_weights(out_prefix)
    assert set(sd) == set(ref_weights)
    for k, w in ref_weights.items():
        rel = rel_err(sd[k], w, floor=1e-12)
        assert rel <= w_rtol, f"{k}: relative weight difference {rel:.3g}"
    return got


def replayed(model_dir, log, dtype=None):
    """The base model in ``model_dir`` (loaded in ``dtype`` if given) with the trajectory ``log`` replayed onto
    it in one process (its adapter too, if the log has one): the replay engine's module, update flushed."""
    import zo_deepspeed as zd
    from transformers import AutoModelForCausalLM

    kw = {} if dtype is None else {"dtype": dtype}
    eng = zd.replay(AutoModelForCausalLM.from_pretrained(model_dir, **kw), log)
    eng.flush()
    return eng.module


# -- bad-input drivers: many CLI cases in one process --------------------------------------------------

def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` -> its bytes (None for a folder): compared before and after a command."""
    return {str(f.relative_to(folder)): (f.read_bytes() if f.is_file() else None) for f in sorted(folder.rglob("*"))}


def drive_cases(spec_path: str, out_path: str) -> None:
    """Each [id, argv] of the spec through zo_deepspeed.cli.main in this one process, stderr captured
    (argparse errors exit via SystemExit); writes {id: [exit status or "traceback", stderr, stdout]}."""
    import contextlib
    import io
    import traceback

    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from zo_deepspeed.cli import main

    out = {}
    for cid, argv in json.loads(Path(spec_path).read_text()):
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - a traceback is a failed case, reported as such
                traceback.print_exc()
                rc = "traceback"
        out[cid] = [rc, err.getvalue(), std.getvalue()]
    Path(out_path).write_text(json.dumps(out))


def run_cases(spec: list, root: Path, timeout: int = 900) -> dict:
    """``drive_cases`` in a fresh process (cwd ``root``) on ``spec``; returns its {id: [rc, stderr, stdout]}."""
    (root / "spec.json").write_text(json.dumps(spec))
    env = repo_env()
    env.pop("ZO_DEEPSPEED_DEBUG", None)
    p = subprocess.run([sys.executable, __file__, "drive", str(root / "spec.json"), str(root / "out.json")], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=root)
    assert p.returncode == 0, p.stderr[-5000:]
    return json.loads((root / "out.json").read_text())


def one_error_line(cmd: str, rc, err: str) -> str:
    """The one ``zo-deepspeed CMD: error: ...`` line of a refused command (asserts exit 2, no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"zo-deepspeed {cmd}: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, f"exit {rc}:\n{err[-3000:]}"
    assert len(lines[0]) < 500, lines[0]  # one readable line, not a dump
    return lines[0]


# -- what a run directory holds -------------------------------------------------------------------------

def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read_trajectory(path: Path):
    """(header as a dict, StepRecords) of a whole trajectory log, read (and verified) by
    zo_deepspeed.trajectory.read_log; the log must be whole (read_log drops a torn last line: here that fails)."""
    from zo_deepspeed.trajectory import read_log

    header, records = read_log(path)
    n = len(Path(path).read_text().splitlines())
    assert n == 1 + len(records), f"{path}: {n} lines for a header and {len(records)} records (a torn line)"
    return header.to_dict(), records


def hf_weights(folder) -> dict:
    """The state dict of the HF model saved in ``folder`` (an export, a replay's output, a base model)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def read_export(run: Path) -> dict:
    """The tensors of a run's export/model.safetensors, as saved."""
    from safetensors.torch import load_file

    return load_file(str(run / "export" / "model.safetensors"))


def read_checkpoint(run: Path, name: str | None = None) -> dict:
    """The tensors of checkpoint ``name`` (default: the latest), every rank's file, keyed (file, tensor)."""
    from safetensors.torch import load_file

    ck = run / "checkpoints" / (name or (run / "checkpoints" / "latest").read_text().strip())
    return {(f.name, k): v for f in sorted(ck.glob("rank*.safetensors")) for k, v in load_file(str(f)).items()}


if __name__ == "__main__" and sys.argv[1:2] == ["drive"]:
    sys.path.insert(0, str(REPO))
    drive_cases(sys.argv[2], sys.argv[3])
