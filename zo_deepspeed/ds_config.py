"""ds_config loading, validation and "auto" filling (pure dicts; no DeepSpeed internals)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .partitions import check_ds_config

__all__ = ["load_ds_config", "validate_ds_config", "fill_auto"]


def load_ds_config(path_or_dict) -> dict:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    p = Path(path_or_dict)
    if not p.exists():
        raise FileNotFoundError(f"ds_config {p} does not exist; pass a JSON file (see ds_configs/)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"ds_config {p} is not valid JSON: {e.msg} at line {e.lineno}") from None


def validate_ds_config(cfg: dict, world_size: int, gpus_per_node: int | None = None) -> None:
    check_ds_config(cfg)
    tbs, mbs, gas = (cfg.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                          "gradient_accumulation_steps"))
    if all(isinstance(v, int) for v in (tbs, mbs, gas)) and tbs != mbs * gas * world_size:
        raise ValueError(f"train_batch_size={tbs} != train_micro_batch_size_per_gpu={mbs} x "
                         f"gradient_accumulation_steps={gas} x world size {world_size}; fix one of them or use \"auto\"")


def fill_auto(cfg: dict, micro_batch: int, grad_accum: int, world_size: int) -> dict:
    cfg = copy.deepcopy(cfg)
    vals = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world_size}
    for k, v in vals.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    return cfg
