"""Time of one ZO step / (2 x one forward) on the same batch.

A ZO step is two forwards plus the weight passes (perturb, flip, and restore+update:
2 passes with fuse_update=True, 3 with False), an all-reduce of two scalars, and
Python. Its ideal cost is exactly 2 forwards; the ratio measures everything else.
"One forward" is what a step runs twice: ``causal_lm_loss(forward, batch)`` under
no_grad (the model's forward plus the float32 cross-entropy over the vocabulary).

Single process (always), interleaved (order rotated every repeat), medians of
``--repeats`` after warm-up; the first ZO step compiles the fused kernel:

* plain module (config None), fuse_update=True and fuse_update=False, each on its own
  copy of the module so each engine stays in its steady state (the fused first pass
  of a step carries the previous step's update);
* DeepSpeed ZeRO-3 at world size 1 (gloo), fuse_update=True, forward through the
  DeepSpeed engine (parameter fetch/release hooks included in both numerator and
  denominator).

With ``--multirank``: 2 gloo ranks launched with the deepspeed launcher
(OMP_NUM_THREADS=1, global batch split across the ranks), ZeRO-3 and
ZeRO-3 + offload_param cpu. Each timed call starts after a barrier and counts the
slowest rank.

Goals: single rank <= 1.10, multi-rank <= 1.25.

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/step_time.py [--threads 1] [--multirank]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: I001
import torch

import zo_deepspeed as zd
from zo_deepspeed.distributed import shard_batch
from zo_deepspeed.engine import causal_lm_loss

LR, EPS = 1e-6, 1e-3


def z3_config(offload: bool = False) -> dict:
    zero = {"stage": 3}
    if offload:
        zero["offload_param"] = {"device": "cpu"}
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1}


def init_single_rank_dist() -> None:
    if torch.distributed.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(C.free_port()))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def forward_fn(eng_or_module, batch):
    f = eng_or_module.forward if isinstance(eng_or_module, zd.ZOEngine) else eng_or_module

    @torch.no_grad()
    def run():
        causal_lm_loss(f, batch)
    return run


# ------------------------------------------------------------------------------ single process
def single_rank(model_name: str, args) -> list[list]:
    batch = C.make_batch(C.model_config(model_name).vocab_size, args.batch, args.seq)
    mod_a = C.build_model(model_name, torch.float32)
    mod_b = copy.deepcopy(mod_a)
    mod_c = copy.deepcopy(mod_a)
    eng_a = zd.initialize(mod_a, None, zd.ZOConfig(lr=LR, eps=EPS, fuse_update=True, perturb="partition"))
    eng_b = zd.initialize(mod_b, None, zd.ZOConfig(lr=LR, eps=EPS, fuse_update=False, perturb="partition"))
    eng_c = zd.initialize(mod_c, None, zd.ZOConfig(lr=LR, eps=EPS, perturb="forward"))
    variants = {"forward": forward_fn(mod_a, batch),
                "zo fuse_update=1": lambda: eng_a.step(batch),
                "zo fuse_update=0": lambda: eng_b.step(batch),
                "zo perturb=forward": lambda: eng_c.step(batch)}
    eng_z = None
    if args.zero3:
        init_single_rank_dist()
        eng_z = zd.initialize(lambda: C.build_model(model_name, torch.float32), z3_config(),
                              zd.ZOConfig(lr=LR, eps=EPS, fuse_update=True, perturb="partition"))
        variants["zero3 forward"] = forward_fn(eng_z, batch)
        variants["zero3 zo fuse_update=1"] = lambda: eng_z.step(batch)
    # warm-up: compile (1-term graph at the first step, 2-term at the second) and fault pages in
    for name, fn in variants.items():
        for _ in range(2 if name.startswith(("zo", "zero3 zo")) else 1):
            print(f"  warm-up {name:24s} {C.timed(fn):7.2f} s", flush=True)
    cpu = {}
    times = C.interleaved(variants, args.repeats, cpu=cpu)
    for name, ts in times.items():
        print(f"  {name:24s} median {C.med(ts):7.3f} s  ({C.spread(ts)})  cpu {C.med(cpu[name]):7.3f} s", flush=True)
    rows = []
    n = C.n_params(mod_a)

    def row(setup, fwd, step):
        f, s = times[fwd], times[step]
        per_rep = [b / (2 * a) for a, b in zip(f, s)]
        ratio = C.med(s) / (2 * C.med(f))
        cratio = C.med(cpu[step]) / (2 * C.med(cpu[fwd]))
        rows.append([model_name, setup, f"{args.batch}x{args.seq}", C.med(f), C.med(s), C.med(s) - 2 * C.med(f),
                     ratio, C.spread(per_rep), cratio,
                     ("met" if ratio <= 1.10 else f"missed by {ratio - 1.10:.2f}") + " / "
                     + ("met" if cratio <= 1.10 else f"missed by {cratio - 1.10:.2f}")])
        print(f"  -> {setup}: step/(2 fwd) = {ratio:.3f} (wall), {cratio:.3f} (CPU)")

    row("1 rank, plain module, fuse_update=1 (2 passes)", "forward", "zo fuse_update=1")
    row("1 rank, plain module, fuse_update=0 (3 passes)", "forward", "zo fuse_update=0")
    row("1 rank, plain module, perturb=forward (1 forward of 2B, 1 pass)", "forward", "zo perturb=forward")
    if eng_z is not None:
        row("1 rank, ZeRO-3 (ws 1), fuse_update=1", "zero3 forward", "zero3 zo fuse_update=1")
    print(f"  ({n / 1e6:.1f} M parameters)")
    del eng_a, eng_b, eng_c, eng_z, mod_a, mod_b, mod_c
    return rows


# ------------------------------------------------------------------------------ multi-rank
def worker(spec_path: str) -> None:
    """Runs on every rank under the deepspeed launcher."""
    spec = json.load(open(spec_path))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    eng = zd.initialize(lambda: C.build_model(spec["model"], torch.float32), z3_config(spec["offload"]),
                        zd.ZOConfig(lr=LR, eps=EPS, fuse_update=True, perturb="partition"))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    full = C.make_batch(C.model_config(spec["model"]).vocab_size, spec["batch"], spec["seq"])
    batch = shard_batch(full)
    fns = {"forward": forward_fn(eng, batch), "step": lambda: eng.step(batch)}

    def timed_max(fn) -> float:
        torch.distributed.barrier()
        t = torch.tensor([C.timed(fn)], dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t)

    warm = [timed_max(fns["forward"]), timed_max(fns["step"]), timed_max(fns["step"])]
    out = {"forward": [], "step": [], "warm": warm, "kind": eng.parts.kind, "world": world,
           "threads": torch.get_num_threads(), "local_numel": eng.parts.local_numel()}
    for r in range(spec["repeats"]):
        for name in (("forward", "step") if r % 2 == 0 else ("step", "forward")):
            out[name].append(timed_max(fns[name]))
    if rank == 0:
        json.dump(out, open(spec["out"], "w"))
    torch.distributed.barrier()


def multirank(model_name: str, offload: bool, args, world: int = 2) -> list | None:
    tmp = Path(tempfile.mkdtemp(prefix="zo_step_time_"))
    spec = {"model": model_name, "offload": offload, "batch": args.batch, "seq": args.seq,
            "repeats": args.repeats, "out": str(tmp / "out.json")}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
           str(C.free_port()), str(Path(__file__).resolve()), "--worker", str(tmp / "spec.json")]
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    setup = f"{world} ranks, ZeRO-3" + (" + offload_param cpu" if offload else "") + ", fuse_update=1"
    print(f"  {setup}: launcher exited {p.returncode} after {time.time() - t:.0f} s")
    if p.returncode != 0 or not (tmp / "out.json").exists():
        print(p.stdout[-4000:], p.stderr[-4000:])
        return [model_name, setup, f"{args.batch}x{args.seq} global", "-", "-", "-", "-", "-", "-",
                f"failed (exit {p.returncode})"]
    o = json.load(open(tmp / "out.json"))
    f, s = o["forward"], o["step"]
    print(f"    forward {f}\n    step {s}\n    warm-up {o['warm']}, kind {o['kind']}, threads/rank {o['threads']}")
    ratio = C.med(s) / (2 * C.med(f))
    per_rep = [b / (2 * a) for a, b in zip(f, s)]
    return [model_name, setup, f"{args.batch}x{args.seq} global", C.med(f), C.med(s), C.med(s) - 2 * C.med(f),
            ratio, C.spread(per_rep), "-", "met" if ratio <= 1.25 else f"missed by {ratio - 1.25:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["opt-125m", "smollm2-135m"], choices=C.MODELS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-zero3", dest="zero3", action="store_false", help="skip the ZeRO-3 world-size-1 rows")
    ap.add_argument("--multirank", action="store_true", help="also 2 ranks ZeRO-3 (+ offload_param cpu)")
    ap.add_argument("--multirank-models", nargs="+", default=["opt-125m"], choices=C.MODELS)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    C.add_threads_arg(ap)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    suffix = C.apply_threads(args)
    if (args.batch, args.seq) != (8, 128):
        suffix += f"-b{args.batch}x{args.seq}"  # a batch-size sweep keeps the default section

    info = C.machine()
    print(info)
    rows = []
    for m in args.models:
        print(f"\n== {m}, batch {args.batch} x seq {args.seq}", flush=True)
        rows += single_rank(m, args)
    if args.multirank:
        for m in args.multirank_models:
            for off in (False, True):
                print(f"\n== {m}, 2 ranks, offload={off}", flush=True)
                rows.append(multirank(m, off, args))
    t = C.table(["model", "setup", "batch x seq", "forward s (median)", "ZO step s (median)",
                 "step - 2 fwd (s)", "step / (2 fwd)", "per-repeat ratio min..max", "CPU-time step / (2 fwd)",
                 "goal (wall / CPU)"], rows)
    print("\n" + t)
    body = (f"fp32 weights, random init, random tokens, batch {args.batch} x seq {args.seq}, lr {LR}, eps {EPS}; "
            f"{args.repeats} interleaved repeats after warm-up (first step compiles); medians. "
            "`step / (2 fwd)` is median step time over twice the median forward time (forward = model + loss "
            "under no_grad, what a step runs twice). `CPU-time` ratio: the same with process CPU time, which other jobs on "
            "this shared machine do not inflate when the process runs 1 thread (no OpenMP spin-waiting); "
            "multi-rank rows: wall time of the slowest rank, each call started after a barrier. "
            "Goals: <= 1.10 at one rank, <= 1.25 multi-rank. " + C.quiet_note() + "\n\n" + t + "\n")
    if not args.no_write:
        C.write_section("step_time" + suffix, "step_time.py: one ZO step vs two forwards"
                        + (f" ({args.threads} thread)" if args.threads else ""), body, info=info)


if __name__ == "__main__":
    main()
