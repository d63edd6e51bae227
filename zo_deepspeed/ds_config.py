"""DeepSpeed config files for a zeroth-order trainer: load, fill "auto", validate.

Pure dict work, run on every rank before anything heavy (no DeepSpeed, no
torch import), so that a bad config fails in a second with one line naming
the key and the fix, instead of minutes later inside ``deepspeed.initialize``
(or never: DeepSpeed silently ignores unknown top-level keys, so a typo like
``"zero_optimisation"`` would train replicated at stage 0).

Typical use::

    cfg = load_ds_config("ds_configs/zero3.json")
    cfg = fill_auto(cfg, micro_batch=4, grad_accum=1, world_size=16, gpus_per_node=8)
    validate_ds_config(cfg, world_size=16, gpus_per_node=8)

The key lists below are DeepSpeed 0.19's; ``tests/test_ds_configs.py``
checks them against the installed DeepSpeed.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["load_ds_config", "validate_ds_config", "fill_auto", "fill_placeholders", "AUTO_KEYS", "TOP_LEVEL_KEYS", "ZERO_KEYS",
           "OFFLOAD_PARAM_KEYS", "REMOVED_TOP_LEVEL_KEYS"]

AUTO = "auto"

# Top-level keys DeepSpeed 0.19's DeepSpeedConfig reads (it ignores every other key).
TOP_LEVEL_KEYS = frozenset({
    "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "csv_monitor", "data_efficiency", "data_types", "dataloader_drop_last",
    "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "optimizer", "pipeline", "prescale_gradients", "scheduler",
    "seq_parallel_communication_data_type", "sequence_parallel_size", "steps_per_print", "tensor_parallel",
    "tensorboard", "timers", "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb",
    "weight_quantization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "zero_optimization",
})

# Removed from DeepSpeed (its config loader raises on them).
REMOVED_TOP_LEVEL_KEYS = frozenset({
    "amp", "compression_training", "curriculum_learning", "eigenvalue", "elasticity", "graph_harvesting",
    "nebula", "progressive_layer_drop", "quantize_training", "sparse_attention", "sparse_gradients",
})
REMOVED_ZERO_KEYS = frozenset({"mics_shard_size", "mics_hierarchical_params_gather", "zeropp_loco_param"})

# zero_optimization keys: DeepSpeedZeroConfig field names and their "stage3_" aliases (both accepted).
ZERO_ALIASES = {
    "prefetch_bucket_size": "stage3_prefetch_bucket_size",
    "param_persistence_threshold": "stage3_param_persistence_threshold",
    "model_persistence_threshold": "stage3_model_persistence_threshold",
    "max_live_parameters": "stage3_max_live_parameters",
    "max_reuse_distance": "stage3_max_reuse_distance",
    "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    "module_granularity_threshold": "stage3_module_granularity_threshold",
    "use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
    "allgather_sequential": "stage3_allgather_sequential",
}
ZERO_DEPRECATED = {
    "cpu_offload": "offload_optimizer",
    "cpu_offload_param": 'offload_param: {"device": "cpu"}',
    "cpu_offload_use_pin_memory": "offload_param.pin_memory",
    "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
}
ZERO_KEYS = frozenset({
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "compute_grad_norm", "load_from_fp32_weights",
    "elastic_checkpoint", "offload_param", "offload_optimizer", "zenflow", "sub_group_size",
    "ignore_unused_parameters", "legacy_stage1", "round_robin_gradients", "parameter_alignment",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "log_trace_cache_warnings", "enable_sanity_checks", "save_muon_momentum_buffer_in_memory", "leaf_module",
    *ZERO_ALIASES, *ZERO_ALIASES.values(), *ZERO_DEPRECATED,
})
OFFLOAD_PARAM_KEYS = frozenset({"device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pin_memory"})

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# Every place "auto" may appear; fill_auto replaces all of them.
AUTO_KEYS = (*BATCH_KEYS, "zero_optimization.zero_hpz_partition_size", "zero_optimization.offload_param.nvme_path")


def _err(msg: str) -> ValueError:
    return ValueError(msg)


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f"did you mean {close[0]!r}? " if close else ""


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _err(f"key {k!r} appears twice in one object (JSON keeps only the last); delete one")
        out[k] = v
    return out


def load_ds_config(path_or_dict: str | Path | dict) -> dict:
    """The config as a fresh dict, from a JSON file or a dict (deep-copied).

    Missing file: FileNotFoundError. Not JSON: ValueError with line and column.
    Duplicate keys are refused (DeepSpeed refuses them too, later).
    """
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict)
    if not isinstance(path_or_dict, (str, Path)):
        raise TypeError(f"ds_config must be a path or a dict, got {type(path_or_dict).__name__}")
    p = Path(path_or_dict)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"ds_config {p} {what}; pass a DeepSpeed JSON file (see ds_configs/README.md)")
    from .fsutil import read_text

    text = read_text(p, "ds_config")
    try:
        cfg = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise _err(f"ds_config {p} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:
        raise _err(f"ds_config {p}: {e}") from None
    if not isinstance(cfg, dict):
        raise _err(f"ds_config {p} must hold a JSON object {{...}}, not a {type(cfg).__name__}")
    return cfg


def _zero(cfg: dict) -> dict:
    z = cfg.get("zero_optimization")
    if z is None:
        return {}
    if not isinstance(z, dict):
        raise _err(f"zero_optimization must be an object like {{\"stage\": 3}}, got {z!r}")
    return z


def _offload_param(zero: dict) -> dict:
    off = zero.get("offload_param")
    if off is None:
        return {}
    if not isinstance(off, dict):
        raise _err(f"zero_optimization.offload_param must be an object like {{\"device\": \"cpu\"}}, got {off!r}")
    return off


def _enabled(cfg: dict, key: str) -> bool:
    block = cfg.get(key)
    if block is None:
        return False
    if not isinstance(block, dict):
        raise _err(f"{key} must be an object like {{\"enabled\": true}}, got {block!r}")
    en = block.get("enabled", False)
    if en == AUTO:
        raise _err(f"{key}.enabled is \"auto\"; set true or false (zo_deepspeed fills only {', '.join(AUTO_KEYS)})")
    return bool(en)


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _err(f"{name}={v!r} must be a positive integer or \"auto\"")
    return v


def fill_auto(cfg: dict, micro_batch: int, grad_accum: int, world_size: int, *,
              gpus_per_node: int | None = None, nvme_path: str | Path | None = None) -> dict:
    """A copy of ``cfg`` with every "auto" replaced from the trainer's settings.

    * batch keys: ``train_micro_batch_size_per_gpu = micro_batch``,
      ``gradient_accumulation_steps = grad_accum``,
      ``train_batch_size = micro_batch * grad_accum * world_size``. A concrete
      value that disagrees with the trainer is refused (the trainer's batching
      is what runs; DeepSpeed's copy is bookkeeping).
    * ``zero_optimization.zero_hpz_partition_size = gpus_per_node``; when
      not given, the launcher's ranks per node (``LOCAL_SIZE`` from the
      ``deepspeed`` launcher, ``LOCAL_WORLD_SIZE`` from ``torchrun``).
    * ``zero_optimization.offload_param.nvme_path = nvme_path``; when not
      given, ``$ZO_NVME_PATH``.
    """
    for name, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        _positive_int(name, v)
    out = load_ds_config(cfg)
    want = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch * grad_accum * world_size}
    src = {"train_micro_batch_size_per_gpu": f"the trainer's micro batch is {micro_batch}",
           "gradient_accumulation_steps": f"the trainer accumulates {grad_accum} micro-batches",
           "train_batch_size": f"micro {micro_batch} x grad_accum {grad_accum} x world {world_size} = "
                               f"{want['train_batch_size']}"}
    for k, v in want.items():
        if k not in out or out[k] == AUTO:
            out[k] = v
        elif out[k] != v:
            raise _err(f"ds_config {k}={out[k]!r} but {src[k]}; set {k} to \"auto\" (or {v})")
    return fill_placeholders(out, gpus_per_node=gpus_per_node, nvme_path=nvme_path)


def fill_placeholders(cfg: dict, *, gpus_per_node: int | None = None, nvme_path: str | Path | None = None) -> dict:
    """A copy of ``cfg`` with the non-batch "auto" values filled (the part of :func:`fill_auto`
    that needs no trainer settings): ``zero_hpz_partition_size`` from ``gpus_per_node`` or the
    launcher's ``LOCAL_SIZE``/``LOCAL_WORLD_SIZE``, ``offload_param.nvme_path`` from ``nvme_path``
    or ``$ZO_NVME_PATH``."""
    out = load_ds_config(cfg)
    zero = out.get("zero_optimization")
    if isinstance(zero, dict):
        if zero.get("zero_hpz_partition_size") == AUTO:
            if gpus_per_node is None:
                env = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")
                gpus_per_node = int(env) if env and env.isdigit() else None
            if gpus_per_node is None:
                raise _err("zero_optimization.zero_hpz_partition_size is \"auto\" but GPUs per node are unknown; "
                           "start under deepspeed/torchrun (they export LOCAL_SIZE/LOCAL_WORLD_SIZE), pass "
                           "gpus_per_node, or write the number into the file")
            zero["zero_hpz_partition_size"] = _positive_int("gpus_per_node", gpus_per_node)
        off = zero.get("offload_param")
        if isinstance(off, dict) and off.get("nvme_path") == AUTO:
            nvme_path = nvme_path or os.environ.get("ZO_NVME_PATH")
            if not nvme_path:
                raise _err("zero_optimization.offload_param.nvme_path is \"auto\": set ZO_NVME_PATH to a "
                           "directory on a fast local NVMe disk (e.g. /local_nvme) or write that path into the file")
            off["nvme_path"] = str(nvme_path)
    return out


def validate_ds_config(cfg: dict, world_size: int, gpus_per_node: int | None = None) -> None:
    """Refuse settings a ZO trainer cannot honour, or that contradict each other.

    Raises ``ValueError`` with one line naming the key and the fix. "auto"
    is accepted where :func:`fill_auto` fills it, so this can run before or
    after filling.
    """
    if not isinstance(cfg, dict):
        raise _err(f"ds_config must be a JSON object (dict), got {type(cfg).__name__}")
    _positive_int("world_size", world_size)
    if gpus_per_node is not None:
        _positive_int("gpus_per_node", gpus_per_node)

    # -- blocks a ZO trainer has no use for -------------------------------------------
    if "optimizer" in cfg:
        raise _err("ds_config has an 'optimizer' block: zeroth-order training uses none; delete the block "
                   "(lr, eps and weight decay are set in the ZO config)")
    if "scheduler" in cfg:
        raise _err("ds_config has a 'scheduler' block: the ZO learning-rate schedule is set in the ZO config; "
                   "delete the block")

    # -- key names ------------------------------------------------------------------------
    for k in cfg:
        if k in REMOVED_TOP_LEVEL_KEYS:
            raise _err(f"ds_config key {k!r} was removed from DeepSpeed (it now refuses the config); delete it")
        if k not in TOP_LEVEL_KEYS:
            raise _err(f"unknown ds_config key {k!r}: {_did_you_mean(k, TOP_LEVEL_KEYS)}DeepSpeed would silently "
                       f"ignore it; fix the name or delete it")
    zero = _zero(cfg)
    for k in zero:
        if k in REMOVED_ZERO_KEYS:
            raise _err(f"zero_optimization.{k} was removed from DeepSpeed; delete it")
        if k not in ZERO_KEYS:
            raise _err(f"unknown key zero_optimization.{k}: {_did_you_mean(k, ZERO_KEYS)}fix the name or delete it")
        if k in ZERO_DEPRECATED:
            raise _err(f"zero_optimization.{k} is deprecated; use zero_optimization.{ZERO_DEPRECATED[k]} instead")
    for short, long in ZERO_ALIASES.items():
        if short in zero and long in zero:
            raise _err(f"zero_optimization sets both {short!r} and its alias {long!r}; keep one ({long!r})")
    off = _offload_param(zero)
    for k in off:
        if k not in OFFLOAD_PARAM_KEYS:
            raise _err(f"unknown key zero_optimization.offload_param.{k}: "
                       f"{_did_you_mean(k, OFFLOAD_PARAM_KEYS)}fix the name or delete it")

    # -- "auto" only where fill_auto fills it ------------------------------------------------
    def scan(d: dict, prefix: str) -> None:
        for k, v in d.items():
            path = f"{prefix}{k}"
            if isinstance(v, dict):
                scan(v, path + ".")
            elif v == AUTO and path not in AUTO_KEYS:
                raise _err(f"{path} is \"auto\", which zo_deepspeed does not fill (it fills {', '.join(AUTO_KEYS)}); "
                           f"set an explicit value")
    scan(cfg, "")

    # -- ZeRO stage ------------------------------------------------------------------------
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise _err(f"zero_optimization.stage={stage!r} must be the integer 0 or 3")
    if stage in (1, 2):
        raise _err(f"zero_optimization.stage={stage} partitions optimizer state and gradients, which ZO training "
                   "does not have; use stage 0 (replicas) or 3 (partitioned parameters)")
    if stage not in (0, 3):
        raise _err(f"zero_optimization.stage={stage} is not a ZeRO stage; use 0 or 3")
    if zero.get("zero_quantized_weights"):
        raise _err("zero_optimization.zero_quantized_weights quantizes each gathered weight to int8 with a step far "
                   "larger than eps*z, which erases the perturbation; set it to false")
    if zero.get("zero_quantized_nontrainable_weights"):
        raise _err("zero_optimization.zero_quantized_nontrainable_weights is not supported with ZO perturbations; "
                   "set it to false")
    if zero.get("offload_optimizer") not in (None, {}) and \
            (zero["offload_optimizer"] or {}).get("device", "none") not in ("none", None):
        raise _err("zero_optimization.offload_optimizer: ZO training has no optimizer state to offload; delete it "
                   "(to keep parameters in CPU memory use zero_optimization.offload_param)")

    # -- offload ------------------------------------------------------------------------------
    device = off.get("device", "none")
    if device is None:
        device = "none"
    if device not in ("none", "cpu", "nvme"):
        raise _err(f"zero_optimization.offload_param.device={device!r}; use none, cpu or nvme")
    if device != "none" and stage != 3:
        raise _err(f"zero_optimization.offload_param.device={device!r} needs zero_optimization.stage=3; "
                   "set stage 3 or remove offload_param")
    if device == "nvme":
        path = off.get("nvme_path")
        if not path or not isinstance(path, str):
            raise _err("zero_optimization.offload_param.device=nvme needs offload_param.nvme_path "
                       "(a directory on a fast local NVMe disk); add it")
    elif "nvme_path" in off and off["nvme_path"] not in (None, AUTO):
        raise _err(f"zero_optimization.offload_param.nvme_path is set but device={device!r}; "
                   "set device to \"nvme\" or remove nvme_path")
    for k in ("buffer_count", "buffer_size", "max_in_cpu"):
        if k in off:
            v = off[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or int(v) != v:
                raise _err(f"zero_optimization.offload_param.{k}={v!r} must be a positive whole number")

    # -- ZeRO++ hpZ -----------------------------------------------------------------------------
    hpz = zero.get("zero_hpz_partition_size", 1)
    if hpz == AUTO:
        hpz = gpus_per_node
    if hpz is not None:
        if isinstance(hpz, bool) or not isinstance(hpz, int) or hpz < 1:
            raise _err(f"zero_optimization.zero_hpz_partition_size={hpz!r} must be a positive integer "
                       "(the GPUs per node) or \"auto\"")
        if hpz > 1:
            if stage != 3:
                raise _err(f"zero_optimization.zero_hpz_partition_size={hpz} needs zero_optimization.stage=3")
            if device == "nvme":
                raise _err("zero_optimization.zero_hpz_partition_size > 1 with offload_param.device=nvme: DeepSpeed "
                           "allocates the hpZ secondary partitions on the offload device, which nvme is not; "
                           "use offload_param cpu or none with hpZ, or set zero_hpz_partition_size to 1")
            if world_size % hpz:
                raise _err(f"zero_optimization.zero_hpz_partition_size={hpz} does not divide the world size "
                           f"{world_size}; set it to the GPUs per node")
            if gpus_per_node is not None and gpus_per_node % hpz and hpz % gpus_per_node:
                raise _err(f"zero_optimization.zero_hpz_partition_size={hpz} does not fit {gpus_per_node} GPUs per "
                           f"node (hpZ groups would straddle nodes); set it to {gpus_per_node}")

    # -- precision --------------------------------------------------------------------------
    fp16 = _enabled(cfg, "fp16")
    bf16 = _enabled(cfg, "bf16") or _enabled(cfg, "bfloat16")
    if "bf16" in cfg and "bfloat16" in cfg:
        raise _err("ds_config has both 'bf16' and its alias 'bfloat16'; keep 'bf16'")
    if fp16 and bf16:
        raise _err("ds_config enables both fp16 and bf16; keep one (bf16 on Ampere or newer, fp16 on V100/T4)")

    # -- batch sizes (DeepSpeed bookkeeping; must still multiply out) ----------------------------
    vals = {}
    for k in BATCH_KEYS:
        v = cfg.get(k)
        if v is None or v == AUTO:
            continue
        vals[k] = _positive_int(k, v)
    tbs, mb, gas = (vals.get(k) for k in BATCH_KEYS)
    if tbs is not None and mb is not None and gas is not None:
        if tbs != mb * gas * world_size:
            raise _err(f"train_batch_size={tbs} but train_micro_batch_size_per_gpu={mb} x gradient_accumulation_steps"
                       f"={gas} x world size {world_size} = {mb * gas * world_size}; set train_batch_size to "
                       f"{mb * gas * world_size} or \"auto\"")
    elif tbs is not None and mb is not None:
        if tbs % (mb * world_size):
            raise _err(f"train_batch_size={tbs} is not a multiple of train_micro_batch_size_per_gpu={mb} x world size "
                       f"{world_size}; set train_batch_size to \"auto\"")
    elif tbs is not None and gas is not None:
        if tbs % (gas * world_size):
            raise _err(f"train_batch_size={tbs} is not a multiple of gradient_accumulation_steps={gas} x world size "
                       f"{world_size}; set train_batch_size to \"auto\"")
    elif tbs is not None and tbs % world_size:
        raise _err(f"train_batch_size={tbs} is not a multiple of the world size {world_size}; "
                   "set it to \"auto\"")
