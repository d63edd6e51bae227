"""The plan: the first candidate that fits, in order of preference (perturbation mode, placement, exactness),
with its notes."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..config import BASE_DEVICES, PARTITION_ONLY_RESTORE, RESTORE_MODES, Perturb, ZOConfig
from ..typed import choices
from ..estimators import ESTIMATORS, n_blocks
from .memory import CONSTANTS, DTYPE_BYTES, GiB, OFFLOADS, Estimate, Hardware, Layout, estimate
from .shapes import ModelShape, activations, load_model_shape

__all__ = ["Plan", "plan", "zo_settings", "PLAN_BASE_DEVICES", "PLAN_PERTURB"]

PLAN_BASE_DEVICES = ("auto", *BASE_DEVICES)  # zo.base_device's choices, or auto: the planner picks
PLAN_PERTURB = choices(Perturb)  # zo.perturb's choices; auto: forward where it fits, else partition


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
    perturb: str = "auto"  # what was asked (--perturb); the chosen candidate's mode is chosen.perturb
    q: int = 1
    estimator: str = "spsa"
    perturb_parallel: int = 1

    def to_dict(self) -> dict:
        def est(e: Estimate) -> dict:
            return {"layout": e.layout.label, "stage": e.layout.stage, "offload": e.layout.offload,
                    "hpz": e.layout.hpz, "ds_config_file": e.ds_config_file, "generated": e.generated,
                    "zo": {"perturb": e.perturb, "restore": e.restore, "base_device": e.base_device, "q": e.q,
                           "estimator": e.estimator, "perturb_parallel": e.perturb_parallel},
                    "blocks": e.blocks, "overrides": zo_settings(e),
                    "per_gpu_gib": {k: v / GiB for k, v in e.per_gpu.items()} | {"total": e.gpu_total / GiB},
                    "per_node_gib": {k: v / GiB for k, v in e.per_node.items()} | {"host_total": e.host_total / GiB,
                                                                                    "nvme": e.disk_per_node / GiB},
                    "activations_gib": {k: (v / GiB if isinstance(v, int) and k not in ("tokens", "blocks") else v)
                                        for k, v in e.activations.items() if k != "phases"}
                    | {"phases": {k: v / GiB for k, v in e.activations["phases"].items()}},
                    "gathered_elements": e.gathered_elements, "fits": e.fits}
        m = self.model
        return {"model": {"name": m.name, "architecture": m.architecture, "params": m.n_params, "layers": m.layers,
                          "hidden": m.hidden, "ffn": m.ffn, "vocab": m.vocab, "heads": m.heads,
                          "kv_dim": m.kv_dim, "largest_param": m.largest_param},
                "hardware": asdict(self.hardware) | {"world": self.hardware.world},
                "dtype": self.dtype, "batch_per_gpu": self.batch, "seq": self.seq, "perturb": self.perturb,
                "q": self.q, "estimator": self.estimator, "perturb_parallel": self.perturb_parallel,
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
    """The trainer overrides that go with an estimate: zo.perturb, zo.restore, zo.q when it is not 1, zo.estimator
    and zo.perturb_parallel when not the defaults, and zo.base_device when a restore copy lives in host memory next
    to GPU-resident partitions."""
    host_copy = e.base_device == "cpu" and e.layout.offload == "none" and e.restore in ("master", "backup")
    return (f"zo.perturb={e.perturb} zo.restore={e.restore}" + (f" zo.q={e.q}" if e.q != 1 else "")
            + (f" zo.estimator={e.estimator}" if e.estimator != "spsa" else "")
            + (f" zo.perturb_parallel={e.perturb_parallel}" if e.perturb_parallel != 1 else "")
            + (" zo.base_device=cpu" if host_copy else ""))


Mode = tuple[str, str, str]  # (perturb, restore, base_device)


def _modes(dtype: str, perturb: str, restore: str, base_device: str, q: int = 1, estimator: str = "spsa",
           perturb_parallel: int = 1) -> tuple[list[Mode], list[Mode]]:
    """(exact, lossy) candidate modes in order of preference: forward mode first (exact in 16 bit without a copy,
    one gather per step, no host z work under offload), then partition mode with exact restore; lossy: MeZO's
    in-place restore of a 16-bit partition."""
    for r in ("backup", "none"):
        if restore == r and dtype == "fp16":
            raise ValueError(f"--restore {r} needs bf16 or fp32 partitions (stochastic rounding of the update); "
                             "use --restore master with fp16")
    try:  # the combinations ZOConfig refuses, with its reason
        ZOConfig(perturb=perturb, restore=restore, q=q, estimator=estimator, perturb_parallel=perturb_parallel)
    except ValueError as err:
        raise ValueError(f"--perturb {perturb} --restore {restore} --q {q} --estimator {estimator} "
                         f"--perturb-parallel {perturb_parallel}: {err}") from None
    if perturb_parallel > 1:  # ranks evaluate different blocks of one stacked forward: forward mode only
        perturb = "forward"
    forward: list[str] = []
    if perturb == "forward" or (perturb == "auto" and restore not in PARTITION_ONLY_RESTORE):
        # update.resolve_restore: forward's auto is none, except fp16 (no stochastic rounding): master
        forward = [restore] if restore != "auto" else ["master" if dtype == "fp16" else "none"]
    exact: list[str] = []
    lossy: list[str] = []
    if perturb == "partition" or (perturb == "auto" and restore != "none"):
        if restore == "auto":
            exact = ["inplace"] if dtype == "fp32" else (["master", "backup"] if dtype == "bf16" else ["master"])
            lossy = [] if dtype == "fp32" else ["inplace"]
        elif restore == "inplace" and dtype != "fp32":
            lossy = ["inplace"]
        else:
            exact = [restore]
    devs = ["same", "cpu"] if base_device == "auto" else [base_device]

    def with_devs(p: str, rs: list[str]) -> list[Mode]:  # restore modes without a copy have no device
        return [(p, r, d) for r in rs for d in (devs if r in ("master", "backup") else ["same"])]

    return with_devs("forward", forward) + with_devs("partition", exact), with_devs("partition", lossy)


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
                  restore: str, base_device: str, attention: str, perturb: str = "auto", q: int = 1,
                  estimator: str = "spsa", perturb_parallel: int = 1) -> None:
    for name, v in (("--gpus-per-node", hw.gpus_per_node), ("--nodes", hw.nodes), ("--batch", batch),
                    ("--seq", seq), ("--q", q), ("--perturb-parallel", perturb_parallel)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
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
    if perturb not in PLAN_PERTURB:
        raise ValueError(f"--perturb {perturb!r}; use one of {', '.join(PLAN_PERTURB)}")
    if restore not in RESTORE_MODES:
        raise ValueError(f"--restore {restore!r}; use one of {', '.join(RESTORE_MODES)}")
    if base_device not in PLAN_BASE_DEVICES:
        raise ValueError(f"--base-device {base_device!r}; use one of {', '.join(PLAN_BASE_DEVICES)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"--estimator {estimator!r}; use spsa or fzoo")
    if hw.world % perturb_parallel:
        raise ValueError(f"--perturb-parallel {perturb_parallel} must divide the world size {hw.world} "
                         "(--gpus-per-node x --nodes): ranks form world / P data groups of P")
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"--attention {attention!r}; use sdpa or eager")
    if shape is not None and shape.max_positions and seq > shape.max_positions:
        raise ValueError(f"--seq {seq} exceeds {shape.name}'s max_position_embeddings ({shape.max_positions})")


def plan(model: str, gpus_per_node: int = 1, nodes: int = 1, gpu_mem: float = 80.0, cpu_mem: float = 256.0,
         offload: str = "auto", dtype: str = "bf16", batch: int = 1, seq: int = 512, restore: str = "auto",
         base_device: str = "auto", attention: str = "sdpa", kv_cache: bool = False, perturb: str = "auto",
         q: int = 1, estimator: str = "spsa", perturb_parallel: int = 1) -> Plan:
    """The first candidate that fits, in order of preference (README: "How much memory").

    Placements, best first: parameters and restore copies on the GPU (replica, hpZ, ZeRO-3), restore copies in
    host memory, parameters offloaded (cpu, nvme). Within each, zo.perturb=forward first (``perturb`` auto or
    forward), then partition mode with exact restore; MeZO's lossy in-place restore (16 bit) after all of them.
    ``q`` perturbations per step: forward mode's one forward stacks K = 2q copies of the ``batch`` (``estimator``
    fzoo: q + 1); ``perturb_parallel`` P > 1 (forward mode only): each rank stacks its share of them.
    """
    hw = Hardware(gpus_per_node, nodes, gpu_mem, cpu_mem)
    zk = dict(q=q, estimator=estimator, perturb_parallel=perturb_parallel)
    _check_inputs(hw, dtype, offload, batch, seq, None, restore, base_device, attention, perturb, **zk)
    exact, lossy = _modes(dtype, perturb, restore, base_device, **zk)
    shape = load_model_shape(model)
    _check_inputs(hw, dtype, offload, batch, seq, shape, restore, base_device, attention, perturb, **zk)
    layouts = _layouts(hw, offload)

    def ev(lay: Layout, m: Mode, hw_: Hardware = hw) -> Estimate:
        p, r, d = m
        return estimate(shape, hw_, lay, dtype, r, d, batch, seq, attention=attention, kv_cache=kv_cache,
                        perturb=p, **zk)

    # preference: parameters and restore copies on the GPU, then restore copies in host memory, then
    # parameters offloaded; in each, the modes in _modes' order (forward first); lossy restore last
    gpu_layouts = [lay for lay in layouts if lay.offload == "none"]
    off_layouts = [lay for lay in layouts if lay.offload != "none"]
    order: list[tuple[Layout, Mode]] = []
    for group in (exact, lossy):
        order += [(lay, m) for m in group if m[2] == "same" for lay in gpu_layouts]
        order += [(lay, m) for m in group if m[2] == "cpu" for lay in gpu_layouts]
        order += [(lay, (p, r, "cpu")) for lay in off_layouts for p, r in dict.fromkeys((p, r) for p, r, _ in group)]
    if not order:
        raise ValueError("no layout matches these options")
    seen, cands = set(), []
    for lay, m in order:
        key = (lay, m[0], m[1], "cpu" if lay.offload != "none" else m[2])
        if key not in seen:
            seen.add(key)
            cands.append(ev(lay, m))
    fitting = [c for c in cands if c.fits]
    notes: list[str] = []
    if fitting:
        chosen, fits = fitting[0], True
        # other candidates that fit without moving parameters further from the GPU than the chosen one
        rank = {"none": 0, "cpu": 1, "nvme": 2}
        alts = [c for c in fitting[1:] if rank[c.layout.offload] <= rank[chosen.layout.offload]
                and (c.layout, c.perturb, c.restore) != (chosen.layout, chosen.perturb, chosen.restore)][:2]
    else:
        chosen, fits = min(cands, key=lambda c: c.overflow), False
        alts = []
    e = chosen

    def gib(x: float) -> str:
        return f"{x / GiB:.1f}"

    if fits and e.perturb == "partition" and perturb == "auto":
        # forward mode was tried first on this layout: what kept it out is its K-times activations
        fwd = next((c for c in cands if c.perturb == "forward" and c.layout == e.layout and not c.fits), None)
        if fwd is not None:
            notes.append(f"forward mode needs {gib(fwd.activations['peak'])} GiB of activations for a K x B = "
                         f"{fwd.blocks} x {batch} batch (partition mode: {gib(e.activations['peak'])} GiB for "
                         f"{batch}), {gib(fwd.gpu_total)} GiB per GPU in all; halve --batch or use "
                         "zo.perturb=partition (chosen)")
    if e.perturb == "forward":
        K = e.blocks
        part_act = activations(shape, batch, seq, DTYPE_BYTES[dtype], attention=attention, kv_cache=kv_cache)["peak"]
        rule = "2q" if estimator == "spsa" else "q + 1"
        share = f" (this rank's share of the step's {e.forwards})" if perturb_parallel > 1 else ""
        notes.append(f"zo.perturb=forward: one forward over K = {K} copies of the batch{share} stacked along the batch "
                     f"dimension (K x B = {K} x {batch} per GPU; zo.estimator={estimator}: K = {rule} per step): "
                     f"activations scale with K ({gib(e.activations['peak'])} "
                     f"GiB here; one forward of B = {batch}: {gib(part_act)} GiB)")
        notes.append(f"zo.perturb=forward never perturbs the partition (zo.restore={e.restore}: "
                     f"{'no restore copy' if e.restore == 'none' else 'the float32 master copy'}); each module reads "
                     f"theta + c_k z_k, a temporary of its own parameters ({gib(e.per_gpu['read_temporary'])} GiB: "
                     f"{CONSTANTS['read_temporaries']} x the largest parameter), and every GPU evaluates z for the K "
                     "blocks over each parameter it reads")
        notes.append(f"K vs batch: the stacked forward holds K x B = {K * batch} rows; doubling zo.q doubles K, so "
                     "halve --batch when doubling --q to keep the activations (a step's forward compute is about the "
                     "same: K x B rows either way); a larger B lowers the variance of each L+/L-, a larger q "
                     "averages more directions")
        if e.layout.stage == 3:
            notes.append("ZeRO-3 gathers every parameter once per step (partition mode: twice per perturbation)")
        if perturb_parallel > 1:
            groups = hw.world // perturb_parallel
            notes.append(f"zo.perturb_parallel={perturb_parallel}: {groups} data group(s) x {perturb_parallel} "
                         f"perturbation groups; the {perturb_parallel} ranks of a data group read the same "
                         f"train.batch_size / {groups} examples and evaluate q / {perturb_parallel} = "
                         f"{q // perturb_parallel} of the step's seeds each. What it costs: every rank still gathers "
                         "the whole model once per step and applies all q seeds in its update pass (q z streams "
                         f"per element); the one all-reduce carries 2 x {e.forwards} float64 per step. What it "
                         f"saves: each rank's forward holds {K} blocks instead of {n_blocks(estimator, q)}, so "
                         "the step's forward time and activations fall by about that ratio")
    if e.restore == "inplace" and dtype != "fp32":
        notes.append("zo.restore=inplace in 16 bit is MeZO's scheme: the +eps/-eps round trip drifts the weights "
                     "(see bench/RESULTS.md drift); zo.perturb=forward (no copy) or master/backup restore exactly")
    if e.base_device == "cpu" and e.layout.offload == "none" and e.restore in ("master", "backup"):
        passes = "1 pass (the update)" if e.perturb == "forward" else f"{e.forwards} passes"
        notes.append("the restore copy lives in host memory and is streamed through the GPU in 4 Mi-element "
                     f"chunks at every pass (PCIe traffic: {passes} x the copy per step)")
    if e.layout.offload != "none":
        if e.perturb == "forward":
            notes.append(f"offload_param {e.layout.offload}: the step's one forward copies every layer to the GPU; "
                         "the host CPUs only apply the update, one pass over the host-resident partitions per step "
                         f"({e.q} z stream{'s' if e.q > 1 else ''} per element; partition mode: {2 * e.q} passes, "
                         f"3 z evaluations per element at q = 1, and {2 * e.q} forwards copying every layer)")
        else:
            notes.append(f"offload_param {e.layout.offload}: each of the {e.forwards} forwards of a step copies every "
                         f"layer to the GPU, and the perturbation passes ({e.forwards} per step, 3 z evaluations per "
                         "element at q = 1) run on the host CPUs over the host-resident partitions")
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
    ctx = CONSTANTS["cuda_context_gib"] * GiB
    too_big = min(c.activations["peak"] for c in cands) + ctx > gpu_mem * GiB
    if not fits and e.activations["peak"] + ctx > gpu_mem * GiB:
        fix = "lower --batch or --seq" + (" (or --q), or use zo.perturb=partition" if e.perturb == "forward" else "")
        notes.append(f"the activations alone ({e.activations['peak'] / GiB:.1f} GiB) exceed a GPU: {fix}")
    if e.activations["phase"] == "loss":
        what = ("batch x seq x vocab x 8 bytes, 12 in fp32" if e.blocks == 1 else
                f"the {e.blocks} blocks' stacked logits and one block's float32 copies")
        notes.append(f"the loss dominates the activations: logits and their float32 copies are "
                     f"{e.activations['loss'] / GiB:.2f} GiB ({what})")
    min_nodes = None
    if not fits and not too_big:  # how many nodes of this shape would hold it on the GPUs (ZeRO-3, no offload)?
        # the leanest modes on the GPU: no copy or a host copy
        lean = [m for m in exact + lossy if m[1] in ("none", "inplace") or m[2] == "cpu"] or (exact + lossy)[:1]
        for k in range(nodes, 1025):
            hw2 = Hardware(gpus_per_node, k, gpu_mem, cpu_mem)
            lay = Layout(3, "none") if hw2.world > 1 else Layout(0, "none")
            if any(ev(lay, m, hw2).fits for m in lean):
                min_nodes = k
                break
    return Plan(model=shape, hardware=hw, dtype=dtype, batch=batch, seq=seq, chosen=chosen, fits=fits,
                alternatives=alts, notes=notes, min_nodes_no_offload=min_nodes, perturb=perturb, **zk)
