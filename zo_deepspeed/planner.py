"""Memory planner: what a ZO step needs per GPU and per node, and which ds_config to use.

``zo-deepspeed plan --model opt-30b --gpus-per-node 8 --nodes 1 --gpu-mem 80 --cpu-mem 512``

A ZO step is two inference forwards plus in-place passes over the local
partition, so its memory is inference memory. Per GPU it is the sum of

* **partition**: the parameters this GPU holds (all of them at ZeRO stage 0,
  1/W at stage 3, none with ``offload_param``), plus the ZeRO++ hpZ secondary
  copy (1/(GPUs per node)) on several nodes, plus the restore copy
  (``zo.restore``: master 4 B/param, backup 2 B/param of the local partition)
  when it lives on the GPU;
* **gathered working set** (stage 3): the full parameters gathered at the
  forward's peak, from a replay of DeepSpeed's fetch / prefetch / release rules
  (``PartitionedParameterCoordinator``: prefetch up to
  ``stage3_prefetch_bucket_size`` elements per module call while fewer than
  ``stage3_max_live_parameters`` are gathered, keep a parameter that is used
  again within ``stage3_max_reuse_distance`` elements) over the model's
  modules in order, with the settings of the proposed ds_config;
* **activations** of one forward under ``no_grad`` (the two forwards of a step
  run one after the other, nothing is kept between them): see
  :func:`activations`. The logits and the float32 copies the loss makes of
  them are ``8*B*S*vocab`` bytes (12 in fp32) and dominate at long sequences; the
  KV cache that HF models build by default (``use_cache``; zo_deepspeed's
  scoring forwards turn it off, ``kv_cache=True`` plans for code that does not)
  is ``2*layers*B*S*kv_dim*b``;
* **buffers**: CUDA context, NCCL, the fused pass's scratch and allocator
  fragmentation (constants below, with the reasons).

Model shapes come from HF ``config.json`` files (``model_configs/`` in this
package for the named models, or a path). The model is built on the meta
device: exact parameter counts and module order, no weights.

GiB (2**30 bytes) throughout; ``--gpu-mem`` / ``--cpu-mem`` are read as GiB
(an "80 GB" A100/H100 has 80 GiB of memory).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["MODEL_NAMES", "ModelShape", "load_model_shape", "activations", "gathered_peak", "plan", "Plan",
           "Estimate", "format_plan", "add_arguments", "run", "CONSTANTS"]

GiB = 2**30
MiB = 2**20
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
MODEL_NAMES = ("opt-1.3b", "opt-13b", "opt-30b", "opt-66b", "llama-7b", "llama-13b", "llama-30b", "llama-65b")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the trainer's model.dtype
OFFLOADS = ("auto", "none", "cpu", "nvme")

# ---------------------------------------------------------------------------- constants (and why)
CONSTANTS = {
    # Outside the caching allocator (torch.cuda.max_memory_reserved does not see it; nvidia-smi does):
    # the CUDA context with lazily loaded modules, cuBLAS/cuDNN handles and workspaces, and the Triton /
    # torch kernels a ZO step loads. A torch process on A100/H100 shows 0.5-1 GiB in nvidia-smi before it
    # allocates a tensor; bench/gpu.py measures it (device used - max reserved) to check this figure.
    "cuda_context_gib": 0.75,
    # NCCL communicator buffers when more than one rank (per-peer, per-channel staging buffers of
    # NCCL_BUFFSIZE = 4 MiB for each protocol): a few hundred MiB per rank on an NVLink node.
    "nccl_gib": 0.5,
    # Caching-allocator fragmentation: blocks freed by one layer's activations or one gather are reused for
    # differently sized ones and are not all returned; reserved - allocated is typically 5-15% of what is
    # allocated and freed during a forward. Applied to activations + gathered parameters (the partitions
    # and restore copies are allocated once, at load, in large blocks).
    "fragmentation": 0.10,
    # The fused perturbation pass: the compiled kernel keeps z in registers (Triton) and allocates a few
    # per-chunk scalars; the eager fallback about a dozen float32/int64 temporaries of one chunk (~60 MB
    # at 1 Mi elements); a host-resident restore copy is streamed through 4 Mi-element chunks (16 MB).
    "fused_scratch_mib": 64,
    # Host memory of one rank's process besides its tensors: Python, torch with the CUDA libraries,
    # DeepSpeed, transformers, the tokenizer and data (RSS of an idle torch CUDA process is 2-4 GiB).
    "host_process_gib": 3.0,
    # NVMe offload keeps partitions smaller than max(1 MiB, aio block) in host memory (DeepSpeed).
    "nvme_min_swap_bytes": MiB,
}

# the ZeRO-3 settings of every shipped ds_config (used if ds_configs/ is not next to the package)
_DEFAULT_ZERO = {"stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
                 "stage3_max_reuse_distance": 1_000_000_000, "stage3_param_persistence_threshold": 0}


# ---------------------------------------------------------------------------- model shapes
@dataclass
class ModelShape:
    name: str
    model_type: str
    architecture: str
    n_params: int            # unique parameters (a tied embedding once)
    layers: int
    hidden: int
    heads: int
    kv_dim: int              # kv_heads * head_dim
    ffn: int
    vocab: int
    gated_mlp: bool          # Llama-style gate/up/down (3 ffn-sized tensors live) vs fc1/act/fc2
    rotary: bool
    max_positions: int | None
    tied_embeddings: bool
    largest_param: int
    param_numel: list[int] = field(repr=False)           # per unique parameter
    module_params: list[list[int]] = field(repr=False)   # per module in forward order: its own parameters


def _first_attr(cfg, names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _read_config(model: str) -> tuple[str, dict]:
    if model in MODEL_NAMES:
        path = CONFIG_DIR / f"{model}.json"
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_NAMES)} "
                             f"or a path to an HF config.json (or its folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path} has no \"model_type\"; pass an HF config.json of a causal LM")
    name = model if model in MODEL_NAMES else str(path)
    return name, raw


@functools.lru_cache(maxsize=32)
def load_model_shape(model: str) -> ModelShape:
    """Shape of a named model (``MODEL_NAMES``) or of an HF config.json, built on the meta device."""
    name, raw = _read_config(model)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(raw)
    mtype = raw.pop("model_type")
    try:
        cfg = AutoConfig.for_model(mtype, **raw)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{name}: transformers cannot read model_type {mtype!r} ({str(e).splitlines()[0]})") from None
    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001  (any construction failure is a bad config for the planner)
        raise ValueError(f"{name}: cannot build a causal LM from this config "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    ids: dict[int, int] = {}
    numel: list[int] = []
    for p in m.parameters():  # unique parameters, in registration order
        ids[id(p)] = len(numel)
        numel.append(p.numel())
    # DeepSpeed hooks every module and fetches its own (recurse=False) parameters; pre-order module
    # order is the forward order for decoder-only LMs up to the placement of small norms
    mods = [[ids[id(p)] for p in mod.parameters(recurse=False)] for _, mod in m.named_modules()]
    hidden = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
    layers = _first_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first_attr(cfg, ("num_attention_heads", "n_head"))
    ffn = _first_attr(cfg, ("intermediate_size", "ffn_dim", "n_inner"), None)
    if None in (hidden, layers, heads):
        raise ValueError(f"{name}: config lacks hidden_size / num_hidden_layers / num_attention_heads")
    ffn = ffn or 4 * hidden
    kv_heads = _first_attr(cfg, ("num_key_value_heads",), heads)
    head_dim = _first_attr(cfg, ("head_dim",), hidden // heads)
    names = [n for n, _ in m.named_modules()]
    gated = any(n.endswith("gate_proj") for n in names)
    rotary = any("rotary" in n for n in names) or getattr(cfg, "rope_theta", None) is not None
    tied = any(p is m.get_input_embeddings().weight for p in m.get_output_embeddings().parameters()) \
        if m.get_output_embeddings() is not None else False
    return ModelShape(name=name, model_type=mtype, architecture=type(m).__name__, n_params=sum(numel),
                      layers=int(layers), hidden=int(hidden), heads=int(heads), kv_dim=int(kv_heads * head_dim),
                      ffn=int(ffn), vocab=int(cfg.vocab_size), gated_mlp=gated, rotary=rotary,
                      max_positions=getattr(cfg, "max_position_embeddings", None), tied_embeddings=tied,
                      largest_param=max(numel), param_numel=numel, module_params=mods)


# ---------------------------------------------------------------------------- activations
def activations(shape: ModelShape, batch: int, seq: int, b: int, *, attention: str = "sdpa",
                kv_cache: bool = False, loss: str = "library") -> dict:
    """Peak bytes live during one no_grad forward + loss, and its parts (all in bytes).

    What is live (HF decoder-only LM, eval mode, no_grad: a tensor dies when its last reference goes):

    * the residual stream: the layer's input and its sum with the block output, ``2*T*h*b``
      (T = batch*seq tokens, b = bytes per element of the model dtype);
    * the attention mask: ``B*S*S`` bool (sdpa) or in the model dtype (eager); with ``eager`` also the
      scores, their float32 softmax and its cast back, ``B*heads*S*S*(2b+4)`` (sdpa's fused kernels
      on GPU never hold them);
    * inside a layer, the larger of the attention block (norm output, q, k, v, rotary outputs,
      attention output and its merged copy) and the MLP block (fc1/act/fc2 models: fc1 output + its
      activation, ``2*T*ffn*b``; gated models: norm output + act(gate) + up + their product,
      ``T*(h + 3*ffn)*b``);
    * the KV cache HF builds when ``config.use_cache`` (the default): every layer's k and v,
      ``2*layers*T*kv_dim*b``, alive until the model returns;
    * the head: final norm output and the logits ``T*vocab*b`` while the cache is still alive;
    * the loss, after the model's output (and its cache) is dropped: the library's ``causal_lm_loss``
      holds a float32 copy of the logits and cross_entropy's float32 log-softmax, ``8*T*vocab``
      (16-bit: the 16-bit logits die when the copy replaces them; float32: ``.float()`` is a view, so the
      logits stay and ``reshape`` copies them when batch > 1: ``12*T*vocab``). ``loss="chunked"``:
      the logits plus 256 rows of float32 at a time.
    """
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention={attention!r}; use sdpa or eager")
    T = batch * seq
    h, kv, f, V, L = shape.hidden, shape.kv_dim, shape.ffn, shape.vocab, shape.layers
    mask = batch * seq * seq * (1 if attention == "sdpa" else b)
    scores = batch * shape.heads * seq * seq * (2 * b + 4) if attention == "eager" else 0
    resid = 2 * T * h * b
    attn = T * b * (h + h + 2 * kv + h + h) + (T * b * 2 * (h + kv) if shape.rotary else 0) + scores
    mlp = T * b * (h + 3 * f) if shape.gated_mlp else T * b * 2 * f
    layer = max(attn, mlp)
    cache = 2 * L * T * kv * b if kv_cache else 0
    logits = T * V * b
    if loss == "library":
        # logits[:, :-1].float(): a new float32 tensor for 16-bit logits (the 16-bit ones die when the name is
        # rebound), a view of float32 ones that reshape() then copies when batch > 1; plus log_softmax
        loss_b = T * V * (8 if b < 4 else (12 if batch > 1 else 8))
    elif loss == "chunked":
        loss_b = logits + 2 * 256 * V * 4
    else:
        raise ValueError(f"loss={loss!r}; use library or chunked")
    phases = {
        "layers": mask + resid + cache + layer,   # at the last layer (the cache is largest there)
        "head": mask + resid + cache + T * h * b + logits,
        "loss": loss_b,
    }
    phase = max(phases, key=phases.get)
    return {"peak": phases[phase], "phase": phase, "phases": phases, "kv_cache": cache, "logits": logits,
            "loss": loss_b, "layer": layer, "residual": resid, "mask": mask, "scores": scores, "tokens": T}


# ---------------------------------------------------------------------------- ZeRO-3 gathers
_GATHER_CACHE: dict[tuple, int] = {}


def gathered_peak(shape: ModelShape, prefetch_bucket: int, max_live: int, max_reuse: int) -> int:
    """Most parameter elements gathered at once during a steady-state ZeRO-3 forward.

    A replay of DeepSpeed's PartitionedParameterCoordinator on the module trace: each module's
    forward pre-hook fetches its own parameters, then prefetches parameters of the following modules
    until ``min(prefetch_bucket, max_live - gathered)`` elements were started (the parameter that
    crosses the limit is still fetched); after the module, its parameters are released unless they
    were prefetched for a later use or are used again within ``max_reuse`` elements of the trace.
    """
    key = (shape.name, shape.n_params, len(shape.module_params), prefetch_bucket, max_live, max_reuse)
    if key not in _GATHER_CACHE:
        _GATHER_CACHE[key] = _replay_gathers(shape, prefetch_bucket, max_live, max_reuse)
    return _GATHER_CACHE[key]


def _replay_gathers(shape: ModelShape, prefetch_bucket: int, max_live: int, max_reuse: int) -> int:
    mods = shape.module_params
    numel = shape.param_numel
    queue = deque((pid, i) for i, ps in enumerate(mods) for pid in sorted(set(ps)))
    avail: set[int] = set()
    fetched_for: dict[int, int] = {}
    n_avail = peak = 0
    for i, ps in enumerate(mods):
        for pid in ps:
            fetched_for[pid] = max(fetched_for.get(pid, -1), i)
            if pid not in avail:
                avail.add(pid)
                n_avail += numel[pid]
        while queue and queue[0][1] <= i:
            queue.popleft()
        budget = min(prefetch_bucket, max_live - n_avail)
        started = 0
        while prefetch_bucket > 0 and queue and started < budget:
            pid, step = queue.popleft()
            fetched_for[pid] = max(fetched_for.get(pid, -1), step)
            if pid not in avail:
                avail.add(pid)
                n_avail += numel[pid]
                started += numel[pid]
        peak = max(peak, n_avail)
        step_id = i + 1
        for pid in set(ps):
            if fetched_for.get(pid, -1) > step_id:
                continue
            traversed, reused = 0, False
            for j in range(step_id, len(mods)):
                if traversed >= max_reuse:
                    break
                if pid in mods[j]:
                    reused = True
                    break
                traversed += sum(numel[q] for q in mods[j])
            if not reused and pid in avail:
                avail.discard(pid)
                n_avail -= numel[pid]
    return peak


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    stage: int
    offload: str       # none | cpu | nvme
    hpz: bool = False

    @property
    def label(self) -> str:
        if self.stage == 0:
            return "ZeRO stage 0 (a full replica per GPU)"
        s = "ZeRO-3"
        if self.hpz:
            s += " + hpZ (secondary partition inside each node)"
        if self.offload != "none":
            s += f" + offload_param {self.offload}"
        return s


def _ds_config_for(layout: Layout, dtype: str) -> tuple[str, dict, bool]:
    """(file name, config dict, generated?) for a layout and dtype."""
    name, cfg, generated = _ds_config_cached(layout, dtype)
    return name, copy.deepcopy(cfg), generated


@functools.lru_cache(maxsize=64)
def _ds_config_cached(layout: Layout, dtype: str) -> tuple[str, dict, bool]:
    stem = {0: "zero0"}.get(layout.stage, "zero3")
    if layout.stage == 3:
        stem += "_hpz" if layout.hpz else {"none": "", "cpu": "_offload_cpu", "nvme": "_nvme"}[layout.offload]
    suffix = {"fp32": "", "bf16": "_bf16", "fp16": "_fp16"}[dtype]
    name = f"{stem}{suffix}.json"
    path = DS_CONFIG_DIR / name
    if path.is_file():
        return f"ds_configs/{name}", json.loads(path.read_text()), False
    # no shipped file (fp16 hpZ / NVMe, or ds_configs/ not next to an installed package): derive one from
    # the shipped file of the same layout in another precision, swapping the precision block in place
    src = next((DS_CONFIG_DIR / f"{stem}{x}.json" for x in ("_bf16", "", "_fp16")
                if (DS_CONFIG_DIR / f"{stem}{x}.json").is_file()), None)
    base = json.loads(src.read_text()) if src is not None else _builtin_ds_config(layout)
    cfg: dict = {}
    for k, v in base.items():
        if k in ("bf16", "fp16"):
            continue
        if k == "zero_optimization" and dtype != "fp32":
            cfg[dtype] = {"enabled": True}
        cfg[k] = copy.deepcopy(v)
    return f"generated ({stem}{suffix}.json)", cfg, True


def _builtin_ds_config(layout: Layout) -> dict:
    zero: dict = {"stage": layout.stage}
    if layout.stage == 3:
        zero.update(_DEFAULT_ZERO)
        if layout.hpz:
            zero["zero_hpz_partition_size"] = "auto"
        if layout.offload == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        if layout.offload == "nvme":
            zero["offload_param"] = {"device": "nvme", "nvme_path": "auto", "pin_memory": True, "buffer_count": 5,
                                     "buffer_size": 100_000_000, "max_in_cpu": 1_000_000_000}
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "zero_optimization": zero,
            "steps_per_print": 1_000_000_000, "wall_clock_breakdown": False}


# ---------------------------------------------------------------------------- estimate of one candidate
@dataclass
class Estimate:
    layout: Layout
    restore: str
    base_device: str
    ds_config_file: str
    ds_config: dict
    generated: bool
    per_gpu: dict          # name -> bytes
    per_node: dict         # name -> bytes
    gpu_total: int
    host_total: int
    disk_per_node: int
    fits_gpu: bool
    fits_host: bool
    activations: dict
    gathered_elements: int
    gpu_cap: int           # bytes per GPU
    host_cap: int          # host bytes per node

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def overflow(self) -> float:
        return max(self.gpu_total / self.gpu_cap, self.host_total / self.host_cap)


@dataclass
class Hardware:
    gpus_per_node: int
    nodes: int
    gpu_mem_gib: float
    cpu_mem_gib: float

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


def estimate(shape: ModelShape, hw: Hardware, layout: Layout, dtype: str, restore: str, base_device: str,
             batch: int, seq: int, *, attention: str = "sdpa", kv_cache: bool = False) -> Estimate:
    """Per-GPU and per-node bytes of one candidate (layout, restore mode, restore-copy device)."""
    b = DTYPE_BYTES[dtype]
    W, gpn = hw.world, hw.gpus_per_node
    P = shape.n_params
    ds_file, ds_cfg, generated = _ds_config_for(layout, dtype)
    zero = {**_DEFAULT_ZERO, **ds_cfg.get("zero_optimization", {})}
    local = P if layout.stage == 0 else sum(math.ceil(n / W) for n in shape.param_numel)
    base_b = {"inplace": 0, "master": 4, "backup": b}[restore]
    base_on_gpu = layout.offload == "none" and base_device == "same"
    act = activations(shape, batch, seq, b, attention=attention, kv_cache=kv_cache)
    gathered = 0
    if layout.stage == 3 and (W > 1 or layout.offload != "none"):
        gathered = gathered_peak(shape, int(zero["stage3_prefetch_bucket_size"]),
                                 int(zero["stage3_max_live_parameters"]), int(zero["stage3_max_reuse_distance"]))
    C = CONSTANTS
    g = {
        "partition": local * b if layout.offload == "none" else 0,
        "hpz_secondary": (P * b) // gpn if layout.hpz else 0,
        "restore_copy": local * base_b if base_on_gpu else 0,
        "gathered": gathered * b,
        "activations": act["peak"],
        "fused_scratch": C["fused_scratch_mib"] * MiB,
        "cuda_context": int(C["cuda_context_gib"] * GiB),
        "nccl": int(C["nccl_gib"] * GiB) if W > 1 else 0,
    }
    g["fragmentation"] = int(C["fragmentation"] * (g["gathered"] + g["activations"]))
    gpu_total = sum(g.values())
    host_resident = 0   # NVMe: small partitions stay in host memory
    if layout.offload == "nvme":
        host_resident = sum(math.ceil(n / W) for n in shape.param_numel
                            if math.ceil(n / W) * b < C["nvme_min_swap_bytes"]) * b
    nvme_buf = 0
    if layout.offload == "nvme":
        op = zero.get("offload_param", {})
        nvme_buf = int(op.get("buffer_count", 5)) * int(op.get("buffer_size", 100_000_000)) * b
    n = {
        "gpus": gpu_total * gpn,
        "host_processes": int(C["host_process_gib"] * GiB) * gpn,
        "host_partitions": (local * b if layout.offload == "cpu" else host_resident) * gpn,
        "host_restore_copies": (0 if base_on_gpu else local * base_b) * gpn,
        "host_nvme_buffers": nvme_buf * gpn,
    }
    host_total = sum(v for k, v in n.items() if k.startswith("host"))
    disk = (local * b - host_resident) * gpn if layout.offload == "nvme" else 0
    return Estimate(layout=layout, restore=restore, base_device="same" if base_on_gpu else "cpu",
                    ds_config_file=ds_file, ds_config=ds_cfg, generated=generated, per_gpu=g, per_node=n,
                    gpu_total=gpu_total, host_total=host_total, disk_per_node=disk,
                    fits_gpu=gpu_total <= hw.gpu_mem_gib * GiB, fits_host=host_total <= hw.cpu_mem_gib * GiB,
                    activations=act, gathered_elements=gathered, gpu_cap=int(hw.gpu_mem_gib * GiB),
                    host_cap=int(hw.cpu_mem_gib * GiB))


# ---------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    model: ModelShape
    hardware: Hardware
    dtype: str
    batch: int
    seq: int
    chosen: Estimate
    fits: bool
    alternatives: list[Estimate]
    notes: list[str]
    min_nodes_no_offload: int | None = None

    def to_dict(self) -> dict:
        def est(e: Estimate) -> dict:
            return {"layout": e.layout.label, "stage": e.layout.stage, "offload": e.layout.offload,
                    "hpz": e.layout.hpz, "ds_config_file": e.ds_config_file, "generated": e.generated,
                    "zo": {"restore": e.restore, "base_device": e.base_device},
                    "per_gpu_gib": {k: v / GiB for k, v in e.per_gpu.items()} | {"total": e.gpu_total / GiB},
                    "per_node_gib": {k: v / GiB for k, v in e.per_node.items()} | {"host_total": e.host_total / GiB,
                                                                                    "nvme": e.disk_per_node / GiB},
                    "activations_gib": {k: (v / GiB if isinstance(v, int) and k != "tokens" else v)
                                        for k, v in e.activations.items() if k != "phases"}
                    | {"phases": {k: v / GiB for k, v in e.activations["phases"].items()}},
                    "gathered_elements": e.gathered_elements, "fits": e.fits}
        m = self.model
        return {"model": {"name": m.name, "architecture": m.architecture, "params": m.n_params, "layers": m.layers,
                          "hidden": m.hidden, "ffn": m.ffn, "vocab": m.vocab, "heads": m.heads,
                          "kv_dim": m.kv_dim, "largest_param": m.largest_param},
                "hardware": asdict(self.hardware) | {"world": self.hardware.world},
                "dtype": self.dtype, "batch_per_gpu": self.batch, "seq": self.seq,
                "fits": self.fits, "verdict": self.verdict, "chosen": est(self.chosen),
                "ds_config": self.chosen.ds_config,
                "alternatives": [est(a) for a in self.alternatives], "notes": self.notes,
                "min_nodes_without_offload": self.min_nodes_no_offload, "constants": CONSTANTS}

    @property
    def verdict(self) -> str:
        e = self.chosen
        zo = zo_settings(e)
        if self.fits:
            return (f"FITS with {e.ds_config_file} and {zo}: {e.gpu_total / GiB:.1f} of "
                    f"{self.hardware.gpu_mem_gib:g} GiB per GPU, {e.host_total / GiB:.1f} of "
                    f"{self.hardware.cpu_mem_gib:g} GiB host per node")
        what = []
        if not e.fits_gpu:
            what.append(f"{e.gpu_total / GiB:.1f} GiB per GPU > {self.hardware.gpu_mem_gib:g}")
        if not e.fits_host:
            what.append(f"{e.host_total / GiB:.1f} GiB host per node > {self.hardware.cpu_mem_gib:g}")
        return f"DOES NOT FIT: the closest layout ({e.ds_config_file}, {zo}) needs {'; '.join(what)}"


def zo_settings(e: Estimate) -> str:
    """The trainer overrides that go with an estimate: zo.restore, and zo.base_device when it matters."""
    host_copy = e.base_device == "cpu" and e.layout.offload == "none" and e.restore != "inplace"
    return f"zo.restore={e.restore}" + (" zo.base_device=cpu" if host_copy else "")


def _restore_options(dtype: str, restore: str, base_device: str) -> list[tuple[str, str]]:
    if restore == "backup" and dtype == "fp16":
        raise ValueError("--restore backup needs bf16 or fp32 partitions (stochastic rounding); "
                         "use --restore master with fp16")
    if restore == "auto":
        # exact restore first; MeZO's in-place restore (lossy in 16 bit, no copy) when nothing else fits
        modes = ["inplace"] if dtype == "fp32" else (["master", "backup", "inplace"] if dtype == "bf16"
                                                     else ["master", "inplace"])
    else:
        modes = [restore]
    devs = ["same", "cpu"] if base_device == "auto" else [base_device]
    return [(m, d) for m in modes for d in (devs if m != "inplace" else ["same"])]


def _layouts(hw: Hardware, offload: str) -> list[Layout]:
    out = []
    if offload in ("auto", "none"):
        out.append(Layout(0, "none"))
        if hw.world > 1:
            if hw.nodes > 1 and hw.gpus_per_node > 1:
                out.append(Layout(3, "none", hpz=True))
            out.append(Layout(3, "none"))
    if offload in ("auto", "cpu"):
        out.append(Layout(3, "cpu"))
    if offload in ("auto", "nvme"):
        out.append(Layout(3, "nvme"))
    return out


def _check_inputs(hw: Hardware, dtype: str, offload: str, batch: int, seq: int, shape: ModelShape | None,
                  restore: str, base_device: str, attention: str) -> None:
    for name, v in (("--gpus-per-node", hw.gpus_per_node), ("--nodes", hw.nodes), ("--batch", batch),
                    ("--seq", seq)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name, v in (("--gpu-mem", hw.gpu_mem_gib), ("--cpu-mem", hw.cpu_mem_gib)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number of GiB, got {v!r}")
    fixed = CONSTANTS["cuda_context_gib"] + (CONSTANTS["nccl_gib"] if hw.world > 1 else 0)
    if hw.gpu_mem_gib <= fixed:
        raise ValueError(f"--gpu-mem {hw.gpu_mem_gib:g} GiB is below the fixed per-GPU overhead "
                         f"({fixed:g} GiB: CUDA context{' + NCCL' if hw.world > 1 else ''}); pass GiB per GPU")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"--dtype {dtype!r}; use bf16, fp16 or fp32")
    if offload not in OFFLOADS:
        raise ValueError(f"--offload {offload!r}; use none, cpu or nvme")
    if restore not in ("auto", "inplace", "master", "backup"):
        raise ValueError(f"--restore {restore!r}; use auto, inplace, master or backup")
    if base_device not in ("auto", "same", "cpu"):
        raise ValueError(f"--base-device {base_device!r}; use auto, same or cpu")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"--attention {attention!r}; use sdpa or eager")
    if shape is not None and shape.max_positions and seq > shape.max_positions:
        raise ValueError(f"--seq {seq} exceeds {shape.name}'s max_position_embeddings ({shape.max_positions})")


def plan(model: str, gpus_per_node: int = 1, nodes: int = 1, gpu_mem: float = 80.0, cpu_mem: float = 256.0,
         offload: str = "auto", dtype: str = "bf16", batch: int = 1, seq: int = 512, restore: str = "auto",
         base_device: str = "auto", attention: str = "sdpa", kv_cache: bool = False) -> Plan:
    """The first layout that fits, in order of speed and exactness (README: "How much memory")."""
    hw = Hardware(gpus_per_node, nodes, gpu_mem, cpu_mem)
    _check_inputs(hw, dtype, offload, batch, seq, None, restore, base_device, attention)
    shape = load_model_shape(model)
    _check_inputs(hw, dtype, offload, batch, seq, shape, restore, base_device, attention)
    layouts = _layouts(hw, offload)
    opts = _restore_options(dtype, restore, base_device)
    exact = [o for o in opts if o[0] != "inplace" or dtype == "fp32"]
    lossy = [o for o in opts if o not in exact]

    def ev(lay, r, d):
        return estimate(shape, hw, lay, dtype, r, d, batch, seq, attention=attention, kv_cache=kv_cache)

    # preference: parameters and restore copies on the GPU, then restore copies in host memory, then
    # parameters offloaded; exact restore before MeZO's lossy in-place restore (16 bit)
    gpu_layouts = [lay for lay in layouts if lay.offload == "none"]
    off_layouts = [lay for lay in layouts if lay.offload != "none"]
    order: list[tuple[Layout, str, str]] = []
    for group in (exact, lossy):
        order += [(lay, r, d) for r, d in group if d == "same" for lay in gpu_layouts]
        order += [(lay, r, d) for r, d in group if d == "cpu" for lay in gpu_layouts]
        order += [(lay, r, "cpu") for lay in off_layouts for r in dict.fromkeys(r for r, _ in group)]
    if not order:
        raise ValueError("no layout matches these options")
    seen, cands = set(), []
    for lay, r, d in order:
        key = (lay, r, "cpu" if lay.offload != "none" else d)
        if key not in seen:
            seen.add(key)
            cands.append(ev(lay, r, d))
    fitting = [c for c in cands if c.fits]
    notes: list[str] = []
    if fitting:
        chosen, fits = fitting[0], True
        # other layouts that fit without moving parameters further from the GPU than the chosen one
        rank = {"none": 0, "cpu": 1, "nvme": 2}
        alts = [c for c in fitting[1:] if rank[c.layout.offload] <= rank[chosen.layout.offload]
                and (c.layout, c.restore) != (chosen.layout, chosen.restore)][:2]
    else:
        chosen, fits = min(cands, key=lambda c: c.overflow), False
        alts = []
    e = chosen
    if e.restore == "inplace" and dtype != "fp32":
        notes.append("zo.restore=inplace in 16 bit is MeZO's scheme: the +eps/-eps round trip drifts the weights "
                     "(see bench/RESULTS.md drift); master/backup restore exactly but need 4 or 2 B/param")
    if e.base_device == "cpu" and e.layout.offload == "none" and e.restore != "inplace":
        notes.append("the restore copy lives in host memory and is streamed through the GPU in 4 Mi-element "
                     "chunks at every pass (PCIe traffic: 2 passes x the copy per step)")
    if e.layout.offload != "none":
        notes.append(f"offload_param {e.layout.offload}: each forward copies every layer to the GPU, and the "
                     "perturbation passes run on the host CPUs over the host-resident partitions")
    if e.layout.offload == "nvme":
        notes.append(f"NVMe: {e.disk_per_node / GiB:.1f} GiB per node on the disk at $ZO_NVME_PATH "
                     "(ds_config 'nvme_path': \"auto\")")
    if e.layout.hpz:
        notes.append("hpZ: zero_hpz_partition_size \"auto\" becomes the GPUs per node "
                     f"({gpus_per_node}); the secondary copy costs 1/{gpus_per_node} of the model per GPU")
    if e.generated:
        notes.append("no shipped ds_config for this layout and dtype: save the generated one below "
                     "(--ds-config-out PATH) and pass it to the trainer with --ds-config PATH")
    if kv_cache and e.activations["kv_cache"] > 0.25 * e.activations["peak"]:
        notes.append(f"the forward's KV cache (HF use_cache=True) is {e.activations['kv_cache'] / GiB:.2f} GiB of "
                     "the activations; zo_deepspeed's forwards pass use_cache=False and do not build it")
    if not fits and e.activations["peak"] + CONSTANTS["cuda_context_gib"] * GiB > gpu_mem * GiB:  # too_big
        notes.append(f"the activations alone ({e.activations['peak'] / GiB:.1f} GiB) exceed a GPU: "
                     "lower --batch or --seq")
    if e.activations["phase"] == "loss":
        notes.append(f"the loss dominates the activations: logits and their float32 copies are "
                     f"{e.activations['loss'] / GiB:.2f} GiB (batch x seq x vocab x 8 bytes, 12 in fp32)")
    min_nodes = None
    too_big = e.activations["peak"] + CONSTANTS["cuda_context_gib"] * GiB > gpu_mem * GiB
    if not fits and not too_big:  # how many nodes of this shape would hold it on the GPUs (ZeRO-3, no offload)?
        for k in range(nodes, 1025):
            hw2 = Hardware(gpus_per_node, k, gpu_mem, cpu_mem)
            lay = Layout(3, "none") if hw2.world > 1 else Layout(0, "none")
            r, d = next((o for o in opts if o[0] == "inplace" or o[1] == "cpu"), opts[0])
            if estimate(shape, hw2, lay, dtype, r, d, batch, seq, attention=attention, kv_cache=kv_cache).fits:
                min_nodes = k
                break
    return Plan(model=shape, hardware=hw, dtype=dtype, batch=batch, seq=seq, chosen=chosen, fits=fits,
                alternatives=alts, notes=notes, min_nodes_no_offload=min_nodes)


# ---------------------------------------------------------------------------- text output
_GPU_ROWS = [("partition", "partition (parameters this GPU holds)"),
             ("hpz_secondary", "hpZ secondary partition"),
             ("restore_copy", "restore copy (zo.restore master/backup)"),
             ("gathered", "gathered working set (ZeRO-3)"),
             ("activations", "activations (peak of one forward + loss)"),
             ("fused_scratch", "fused pass scratch"),
             ("cuda_context", "CUDA context, handles, kernels"),
             ("nccl", "NCCL buffers"),
             ("fragmentation", "allocator fragmentation")]
_NODE_ROWS = [("gpus", "GPU memory, all GPUs of the node"),
              ("host_processes", "host: rank processes"),
              ("host_partitions", "host: offloaded partitions"),
              ("host_restore_copies", "host: restore copies"),
              ("host_nvme_buffers", "host: NVMe swap buffers")]


def _g(x: float) -> str:
    return f"{x / GiB:9.2f}"


def format_plan(p: Plan) -> str:
    m, hw, e = p.model, p.hardware, p.chosen
    a = e.activations
    lines = [
        f"model      {m.name}: {m.architecture}, {m.n_params / 1e9:.2f} B parameters, {m.layers} layers, "
        f"hidden {m.hidden}, ffn {m.ffn}, vocab {m.vocab}",
        f"hardware   {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) of {hw.gpu_mem_gib:g} GiB, "
        f"{hw.cpu_mem_gib:g} GiB host memory per node (world size {hw.world})",
        f"workload   {p.dtype}, micro-batch {p.batch} x {p.seq} tokens per GPU "
        f"(train.batch_size = {p.batch} x {hw.world} x grad_accum)",
        f"layout     {e.layout.label}",
        f"ds_config  {e.ds_config_file}",
        f"zo         {zo_settings(e)}",
        "",
        f"{'per GPU':44s}{'GiB':>9s}",
    ]
    detail = {
        "partition": f"{'all' if e.layout.stage == 0 else f'1/{hw.world}'} of {m.n_params / 1e9:.2f} B x "
                     f"{DTYPE_BYTES[p.dtype]} B" if e.layout.offload == "none" else "in host memory / NVMe",
        "gathered": f"{e.gathered_elements / 1e6:.0f} M elements at the peak" if e.gathered_elements else "",
        "activations": f"peak in '{a['phase']}': KV cache {a['kv_cache'] / GiB:.2f}, logits {a['logits'] / GiB:.2f}, "
                       f"loss {a['loss'] / GiB:.2f}, layer {a['layer'] / GiB:.2f}",
        "fragmentation": f"{CONSTANTS['fragmentation']:.0%} of gathered + activations",
    }
    for k, label in _GPU_ROWS:
        v = e.per_gpu[k]
        if v or k in ("partition", "activations"):
            lines.append(f"  {label:42s}{_g(v)}   {detail.get(k, '')}".rstrip())
    lines.append(f"  {'total':42s}{_g(e.gpu_total)}   of {hw.gpu_mem_gib:g} "
                 f"({e.gpu_total / (hw.gpu_mem_gib * GiB):.0%})")
    lines += ["", f"{'per node':44s}{'GiB':>9s}"]
    for k, label in _NODE_ROWS:
        v = e.per_node[k]
        if v or k in ("gpus", "host_processes"):
            lines.append(f"  {label:42s}{_g(v)}")
    lines.append(f"  {'host total':42s}{_g(e.host_total)}   of {hw.cpu_mem_gib:g} "
                 f"({e.host_total / (hw.cpu_mem_gib * GiB):.0%})")
    if e.disk_per_node:
        lines.append(f"  {'NVMe (disk)':42s}{_g(e.disk_per_node)}")
    lines += ["", f"verdict    {p.verdict}"]
    if p.fits:
        ds = e.ds_config_file if not e.generated else "PATH (the generated config, --ds-config-out PATH)"
        launcher = ("zo-deepspeed train" if hw.world == 1 else f"GPUS={hw.gpus_per_node} launch/single_node.sh"
                    if hw.nodes == 1 else "launch/multi_node.sh (or launch/slurm.sbatch)")
        lines.append(f"run with   {launcher} --ds-config {ds} model.dtype={TORCH_DTYPE[p.dtype]} "
                     f"train.batch_size={p.batch * hw.world} {zo_settings(e)}")
    if not p.fits and p.min_nodes_no_offload:
        k = p.min_nodes_no_offload
        lines.append(f"           {k * hw.gpus_per_node} such GPUs ({k} node(s) of {hw.gpus_per_node}) hold it without "
                     f"offload ({'ZeRO-3' if k * hw.gpus_per_node > 1 else 'stage 0'})")
    for alt in p.alternatives:
        lines.append(f"also fits  {alt.ds_config_file}, {zo_settings(alt)}: {alt.gpu_total / GiB:.1f} GiB per GPU, "
                     f"{alt.host_total / GiB:.1f} GiB host per node")
    for n in p.notes:
        lines.append(f"note       {n}")
    if e.generated:
        lines += ["", "generated ds_config:", json.dumps(e.ds_config, indent=2)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True,
                    help=f"{', '.join(MODEL_NAMES)}, or a path to an HF config.json (or its folder)")
    ap.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (ranks) per node (default 1)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    ap.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB (an 80 GB H100: 80)")
    ap.add_argument("--cpu-mem", type=float, required=True, help="host memory per node in GiB")
    ap.add_argument("--offload", default="auto", choices=OFFLOADS,
                    help="parameter offload; auto (default): the first that fits of none, cpu, nvme")
    ap.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES), help="parameter dtype (default bf16)")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch per GPU: examples in each rank's forward")
    ap.add_argument("--seq", type=int, default=512, help="tokens per example (default 512)")
    ap.add_argument("--restore", default="auto", choices=("auto", "inplace", "master", "backup"),
                    help="zo.restore; auto: exact restore (master, then backup for bf16) where it fits, "
                         "else inplace")
    ap.add_argument("--base-device", default="auto", choices=("auto", "same", "cpu"),
                    help="zo.base_device of the restore copy; auto: on the GPU if it fits, else host memory")
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"),
                    help="attention implementation (eager materializes the B x heads x S x S scores)")
    ap.add_argument("--kv-cache", action="store_true",
                    help="plan for forwards that build HF's KV cache (use_cache=True, HF's default, e.g. the MeZO "
                         "reference code); zo_deepspeed's own forwards pass use_cache=False")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--ds-config-out", metavar="PATH", help="also write the proposed ds_config to PATH")


def run(args) -> int:
    """The ``plan`` subcommand: 0 if it fits, 1 if it does not; bad input raises ValueError."""
    p = plan(args.model, args.gpus_per_node, args.nodes, args.gpu_mem, args.cpu_mem, args.offload, args.dtype,
             args.batch, args.seq, args.restore, args.base_device, args.attention, args.kv_cache)
    print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p))
    if getattr(args, "ds_config_out", None):
        out = Path(args.ds_config_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(p.chosen.ds_config, indent=2) + "\n")
        if not args.json:
            print(f"wrote {out}")
    return 0 if p.fits else 1
