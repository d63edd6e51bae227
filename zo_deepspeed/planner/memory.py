"""Per-candidate memory: the constants (and why), the layouts and their ds_configs, and :func:`estimate`,
the per-GPU and per-node bytes of one (layout, perturbation mode, restore mode, restore-copy device)."""
from __future__ import annotations

import copy
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..config import PARTITION_ONLY_RESTORE, RESTORE_MODES
from ..estimators import ESTIMATORS, n_blocks
from .shapes import ModelShape, activations, gathered_peak

__all__ = ["GiB", "MiB", "DS_CONFIG_DIR", "DTYPE_BYTES", "TORCH_DTYPE", "OFFLOADS", "PERTURB_MODES", "CONSTANTS",
           "Layout", "Hardware", "Estimate", "estimate"]

GiB = 2**30
MiB = 2**20
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "ds_configs"
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
TORCH_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # the trainer's model.dtype
OFFLOADS = ("auto", "none", "cpu", "nvme")
PERTURB_MODES = ("forward", "partition")  # zo.perturb once auto is decided (what an estimate is for)
RESTORE_BYTES = {"none": 0, "inplace": 0, "master": 4}  # restore copy per local parameter; backup: the dtype's
# resolved restore modes of each perturbation mode, by ZOConfig's rules: forward never perturbs the partition, so
# the partition-only modes (inplace, backup) have nothing to restore; none keeps it unperturbed, which only forward does
_RESTORES_OF = {"forward": tuple(r for r in RESTORE_MODES if r != "auto" and r not in PARTITION_ONLY_RESTORE),
                "partition": tuple(r for r in RESTORE_MODES if r not in ("auto", "none"))}

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
    # zo.perturb=forward: copies of the largest parameter (in the model dtype, on the GPU that runs the
    # forward) live at once. A wrapped module computes block k's rows with p.data = theta + c_k z_k written
    # into one scratch buffer that every module call reuses (perturb.py: ReadPerturbation._scratch), sized
    # by the largest module's own parameters (an nn.Embedding lookup perturbs only the looked-up rows, but
    # a tied or untied lm_head reads a full vocab x hidden weight: the largest parameter). The buffer stays
    # allocated between steps. Measured on CPU (tests/test_planner.py, a step whose extra memory is the
    # tied embedding).
    "read_temporaries": 1,
}

# the ZeRO-3 settings of every shipped ds_config (used if ds_configs/ is not next to the package)
_DEFAULT_ZERO = {"stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
                 "stage3_max_reuse_distance": 1_000_000_000, "stage3_param_persistence_threshold": 0}


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
    perturb: str           # forward | partition
    q: int                 # perturbations per step; forward mode stacks K = 2q blocks of the batch (spsa)
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
    estimator: str = "spsa"  # zo.estimator: spsa (K = 2q) or fzoo (K = q + 1)
    perturb_parallel: int = 1  # zo.perturb_parallel: ranks of a data group share the step's q seeds

    @property
    def forwards(self) -> int:
        """The models a step evaluates (all ranks together): K = 2q (spsa) or q + 1 (fzoo)."""
        return n_blocks(self.estimator, self.q)

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    @property
    def overflow(self) -> float:
        return max(self.gpu_total / self.gpu_cap, self.host_total / self.host_cap)

    @property
    def blocks(self) -> int:
        """Copies of the batch in one rank's forward: forward mode its share of the K blocks (all K unless
        perturbation-parallel: 2q / P for spsa, q / P + 1 for fzoo, whose clean block every rank evaluates);
        partition mode 1 (the K forwards run one after the other)."""
        return n_blocks(self.estimator, self.q // self.perturb_parallel) if self.perturb == "forward" else 1


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
             batch: int, seq: int, *, attention: str = "sdpa", kv_cache: bool = False, perturb: str = "partition",
             q: int = 1, estimator: str = "spsa", perturb_parallel: int = 1) -> Estimate:
    """Per-GPU and per-node bytes of one candidate (layout, perturbation mode, restore mode, restore-copy
    device) with ``q`` perturbations per step, ``estimator`` spsa or fzoo (the step's K = 2q or q + 1 models) and
    ``perturb_parallel`` P (forward mode: each rank's forward holds the blocks of its q / P seeds: estimators.n_blocks).

    ``perturb="partition"``: every forward is one of batch ``batch`` (2q of them per step, one after the
    other); the restore copy of ``restore`` (master 4 B, backup 2 B per local parameter).
    ``perturb="forward"``: one forward over K = 2q stacked copies of the batch (:func:`activations` with
    ``blocks=K``), plus the perturbed read copies of the largest parameter (``CONSTANTS["read_temporaries"]``);
    no restore copy with ``restore="none"`` (``master`` still holds its float32 copy).
    """
    if perturb not in PERTURB_MODES:
        raise ValueError(f"perturb={perturb!r}; use forward or partition (auto is decided by plan())")
    if restore not in _RESTORES_OF[perturb]:
        raise ValueError(f"restore={restore!r} does not go with perturb={perturb!r}; use one of "
                         f"{', '.join(_RESTORES_OF[perturb])} (config.ZOConfig's rules)")
    if not isinstance(q, int) or q < 1:
        raise ValueError(f"q={q!r}; use an integer >= 1")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; use spsa or fzoo")
    if not isinstance(perturb_parallel, int) or perturb_parallel < 1 or q % perturb_parallel \
            or hw.world % perturb_parallel:
        raise ValueError(f"perturb_parallel={perturb_parallel!r} must divide q={q} and the world size {hw.world}")
    if perturb_parallel > 1 and perturb != "forward":
        raise ValueError("perturb_parallel > 1 needs perturb=forward (ranks evaluate different blocks)")
    b = DTYPE_BYTES[dtype]
    W, gpn = hw.world, hw.gpus_per_node
    P = shape.n_params
    K = n_blocks(estimator, q // perturb_parallel) if perturb == "forward" else 1
    ds_file, ds_cfg, generated = _ds_config_for(layout, dtype)
    zero = {**_DEFAULT_ZERO, **ds_cfg.get("zero_optimization", {})}
    local = P if layout.stage == 0 else sum(math.ceil(n / W) for n in shape.param_numel)
    base_b = RESTORE_BYTES.get(restore, b)  # backup: a copy in the partition dtype
    base_on_gpu = layout.offload == "none" and base_device == "same"
    act = activations(shape, batch, seq, b, attention=attention, kv_cache=kv_cache, blocks=K)
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
        # forward mode: theta + c_k z_k of the module being read (the largest parameter), on the GPU whatever
        # the layout (it is made from the gathered copy); not in fragmentation: one size, reused block by block
        "read_temporary": C["read_temporaries"] * shape.largest_param * b if perturb == "forward" else 0,
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
    return Estimate(layout=layout, restore=restore, base_device="same" if base_on_gpu else "cpu", perturb=perturb, q=q,
                    estimator=estimator, perturb_parallel=perturb_parallel,
                    ds_config_file=ds_file, ds_config=ds_cfg, generated=generated, per_gpu=g, per_node=n,
                    gpu_total=gpu_total, host_total=host_total, disk_per_node=disk,
                    fits_gpu=gpu_total <= hw.gpu_mem_gib * GiB, fits_host=host_total <= hw.cpu_mem_gib * GiB,
                    activations=act, gathered_elements=gathered, gpu_cap=int(hw.gpu_mem_gib * GiB),
                    host_cap=int(hw.cpu_mem_gib * GiB))
