"""The ``plan`` subcommand: its arguments, the text report and the JSON output."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import RESTORE_MODES
from ..estimators import ESTIMATORS
from .memory import CONSTANTS, DTYPE_BYTES, OFFLOADS, TORCH_DTYPE, GiB
from .planning import PLAN_BASE_DEVICES, PLAN_PERTURB, Plan, plan, zo_settings
from .shapes import MODEL_NAMES

__all__ = ["format_plan", "add_arguments", "run"]


# ---------------------------------------------------------------------------- text output
_GPU_ROWS = [("partition", "partition (parameters this GPU holds)"),
             ("hpz_secondary", "hpZ secondary partition"),
             ("restore_copy", "restore copy (zo.restore master/backup)"),
             ("gathered", "gathered working set (ZeRO-3)"),
             ("activations", "activations (peak of one forward + loss)"),
             ("read_temporary", "perturbed read copies (zo.perturb=forward)"),
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
        f"(train.batch_size = {p.batch} x {hw.world // e.perturb_parallel} "
        f"{'data groups ' if e.perturb_parallel > 1 else ''}x grad_accum), q = {e.q}: "
        + (f"one forward of K x B = {e.blocks} x {p.batch} stacked per step (zo.perturb=forward)"
           if e.perturb == "forward" else f"{e.forwards} forwards of B = {p.batch} per step (zo.perturb=partition)")
        + (f", zo.estimator={e.estimator}" if e.estimator != "spsa" else "")
        + (f", zo.perturb_parallel={e.perturb_parallel}" if e.perturb_parallel != 1 else ""),
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
        "activations": (f"K x B = {e.blocks} x {p.batch}; " if e.blocks > 1 else "")
                       + f"peak in '{a['phase']}': KV cache {a['kv_cache'] / GiB:.2f}, logits {a['logits'] / GiB:.2f}, "
                       f"loss {a['loss'] / GiB:.2f}, layer {a['layer'] / GiB:.2f}",
        "read_temporary": f"{CONSTANTS['read_temporaries']} x the largest parameter ({m.largest_param / 1e6:.0f} M "
                          f"elements x {DTYPE_BYTES[p.dtype]} B)",
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
                     f"train.batch_size={p.batch * hw.world // e.perturb_parallel} {zo_settings(e)}")
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
    ap.add_argument("--perturb", default="auto", choices=PLAN_PERTURB,
                    help="zo.perturb; auto (default): forward (one forward over K = 2q stacked copies of the batch, "
                         "no restore copy) where its K-times activations fit, else partition")
    ap.add_argument("--q", type=int, default=1, help="zo.q, perturbations per step (default 1); forward mode "
                                                     "stacks K = 2q copies of the batch")
    ap.add_argument("--estimator", default="spsa", choices=ESTIMATORS,
                    help="zo.estimator: spsa (K = 2q models per step, default) or fzoo (q one-sided + one clean: "
                         "K = q + 1)")
    ap.add_argument("--perturb-parallel", type=int, default=1, metavar="P",
                    help="zo.perturb_parallel: P ranks of a data group evaluate different seeds of the step on the "
                         "same data (forward mode; P divides --q and the world size; default 1)")
    ap.add_argument("--restore", default="auto", choices=RESTORE_MODES,
                    help="zo.restore; auto: none for zo.perturb=forward (master for fp16); for partition: exact "
                         "restore (master, then backup for bf16) where it fits, else inplace")
    ap.add_argument("--base-device", default="auto", choices=PLAN_BASE_DEVICES,
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
             args.batch, args.seq, args.restore, args.base_device, args.attention, args.kv_cache,
             perturb=args.perturb, q=args.q, estimator=args.estimator, perturb_parallel=args.perturb_parallel)
    print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p))
    if getattr(args, "ds_config_out", None):
        out = Path(args.ds_config_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(p.chosen.ds_config, indent=2) + "\n")
        if not args.json:
            print(f"wrote {out}")
    return 0 if p.fits else 1
