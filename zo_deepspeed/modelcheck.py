"""Checks of a model folder before any rank loads its weights: a folder whose config.json names another
architecture than its weights, or whose weights are missing or truncated, would otherwise train from a
random initialisation (every weight reported MISSING) or fail deep inside a load.

:func:`check_model_files` reads only config.json and the weight files' headers (safetensors: a few KB;
sharded: the index and each shard's header; ``.bin``: memory-mapped), builds the architecture on the
meta device (no memory) and compares its state-dict names and shapes with the files'. Tied weights count
as present when one of their names is, buffers are optional; an adapter is never part of the base.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["ModelFileError", "check_model_files", "weight_shapes"]


class ModelFileError(ValueError):
    """A model folder that cannot be trained as it is; the message names the file and the fix."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__


def _safetensors_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise ModelFileError(f"{f} is truncated or not a safetensors file ({size} bytes); copy the model "
                                 "folder again from its source")
        try:
            meta = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise ModelFileError(f"{f}: its safetensors header does not parse (corrupt file); copy the model "
                                 "folder again from its source") from None
    tensors = {k: v for k, v in meta.items() if k != "__metadata__"} if isinstance(meta, dict) else {}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelFileError(f"{f}: its safetensors header is malformed; copy the model folder again") from None
    if 8 + n + end > size:
        raise ModelFileError(f"{f} is truncated: {size} bytes, its header describes {8 + n + end}; copy the "
                             "model folder again from its source")
    return shapes


def _bin_shapes(f: Path) -> dict[str, tuple[int, ...]]:
    import torch

    try:
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the file is the same problem
        raise ModelFileError(f"{f} cannot be read ({_one_line(e)}); copy the model folder again") from None
    if not isinstance(sd, dict):
        raise ModelFileError(f"{f} does not hold a state dict; pass an HF model folder")
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def _sharded(folder: Path, index: Path, read) -> dict[str, tuple[int, ...]]:
    try:
        wmap = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(wmap, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise ModelFileError(f"{index} is not a valid index (a JSON object with a weight_map); copy the model "
                             "folder again") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(wmap.values())):
        f = folder / shard
        if not f.is_file():
            raise ModelFileError(f"{f} is missing (named by {index.name}); copy the model folder again")
        have = read(f)
        lost = [k for k, s in wmap.items() if s == shard and k not in have]
        if lost:
            raise ModelFileError(f"{f} lacks {lost[0]} (and {len(lost) - 1} more) that {index.name} puts there; "
                                 "copy the model folder again")
        shapes.update(have)
    return shapes


def weight_shapes(folder: str | Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(the weight file(s) as named, {tensor name: shape}) of an HF model folder, in transformers' order of
    preference. Raises :class:`ModelFileError` when there are none or they are unreadable/truncated."""
    p = Path(folder)
    if (p / "model.safetensors").is_file():
        return "model.safetensors", _safetensors_shapes(p / "model.safetensors")
    if (p / "model.safetensors.index.json").is_file():
        return "model.safetensors.index.json", _sharded(p, p / "model.safetensors.index.json", _safetensors_shapes)
    if (p / "pytorch_model.bin").is_file():
        return "pytorch_model.bin", _bin_shapes(p / "pytorch_model.bin")
    if (p / "pytorch_model.bin.index.json").is_file():
        return "pytorch_model.bin.index.json", _sharded(p, p / "pytorch_model.bin.index.json", _bin_shapes)
    if (p / "adapter_config.json").is_file():
        raise ModelFileError(f"{p} is a peft adapter folder (adapter_config.json), not a base model; pass the base "
                             "model's folder as model.path")
    raise ModelFileError(f"{p} has no weights (model.safetensors, model.safetensors.index.json or "
                         "pytorch_model.bin); copy the model's weight files next to its config.json")


def _matches(name: str, patterns) -> bool:
    return any(re.search(pat, name) for pat in (patterns or ()))


def check_model_files(path: str | Path, key: str = "model.path") -> None:
    """Refuse a model folder whose config.json does not parse or names an architecture transformers cannot
    build as a causal LM, whose weights are missing, unreadable or truncated, or whose tensors (names,
    shapes) are not those of config.json's architecture. Reads headers only; builds on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .guard import show_setting

    p = Path(path)
    at = show_setting(key, path)
    cfg_file = p / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{cfg_file} is not UTF-8 text ({e.reason} at byte {e.start}); restore the model's "
                             "own config.json") from None
    except ValueError as e:
        raise ModelFileError(f"{cfg_file} is not valid JSON ({_one_line(e)}); restore the model's own "
                             "config.json") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ModelFileError(f"{cfg_file} names no model_type; restore the model's own config.json")
    try:
        mc = AutoConfig.from_pretrained(str(p))
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad field values: the file is the problem
        raise ModelFileError(f"{cfg_file} cannot be read by transformers ({_one_line(e)}); restore the model's "
                             "own config.json") from None
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # construction notes ("add is_decoder=True") are not the user's business
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(mc)
    except Exception as e:  # noqa: BLE001
        raise ModelFileError(f"{cfg_file}: model_type {raw['model_type']!r} is not a causal language model "
                             f"transformers can build ({_one_line(e)[:120]}); pass a causal LM folder as {key}") \
            from None
    finally:
        hf_logging.set_verbosity(level)
    arch = type(model).__name__
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    buffers = {n for n, _ in model.named_buffers()}
    groups: dict[int, list[str]] = {}
    for n, prm in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(prm), []).append(n)
    alias = {n: g for g in groups.values() for n in g}
    files, have = weight_shapes(p)
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and not set(have) & set(expected):  # a base-model checkpoint ("layers.0...") of a *ForCausalLM
        prefixed = {f"{prefix}.{k}": s for k, s in have.items()}
        if set(prefixed) & set(expected):
            have = prefixed
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None)
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    missing = [k for k in expected if k not in have and k not in buffers and not _matches(k, ignore_missing)
               and not any(a in have for a in alias.get(k, ()))]
    unexpected = [k for k in have if k not in expected and k not in buffers and not _matches(k, ignore_unexpected)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(expected)} tensors are not in the weights (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors of the weights are not in it (e.g. {unexpected[0]})")
        raise ModelFileError(f"{at}: config.json describes a {arch} (model_type {raw['model_type']!r}) but "
                             f"{files} holds another model: {'; '.join(parts)}; config.json and the weights must "
                             "come from the same model (restore its own config.json)")
    bad = [(k, have[k], expected[k]) for k in have if k in expected and have[k] != expected[k]]
    if bad:
        k, got, want = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ModelFileError(f"{at}: tensor {k} has shape {list(got)} in {files} but config.json's {arch} "
                             f"expects {list(want)}{more}; config.json and the weights come from different sizes of "
                             "the model (restore its own config.json)")
