"""The plan: the first candidate that fits, in order of speed and exactness, with its notes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import BASE_DEVICES, RESTORE_MODES
from .memory import CONSTANTS, DTYPE_BYTES, GiB, OFFLOADS, Estimate, Hardware, Layout, estimate
from .shapes import ModelShape, load_model_shape

__all__ = ["Plan", "plan", "zo_settings", "PLAN_BASE_DEVICES"]

PLAN_BASE_DEVICES = ("auto", *BASE_DEVICES)  # zo.base_device's choices, or auto: the planner picks


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
    if restore not in RESTORE_MODES:
        raise ValueError(f"--restore {restore!r}; use one of {', '.join(RESTORE_MODES)}")
    if base_device not in PLAN_BASE_DEVICES:
        raise ValueError(f"--base-device {base_device!r}; use one of {', '.join(PLAN_BASE_DEVICES)}")
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
