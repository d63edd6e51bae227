"""Scaling study: the same short ZO run at world sizes 1, 2 and 4 (gloo ranks, ZeRO-3).

For each world size W, the deepspeed launcher starts W CPU ranks (1 thread
each) that load the same saved model under ZeRO-3, run one warm-up step
(compiles the fused kernel) and then ``--steps`` timed steps on the same global
batches (each rank takes its shard). Reported per W:

* time per step: median over the timed steps of the slowest rank's wall time
  (each step starts after a barrier);
* bytes communicated per step and rank, from DeepSpeed's own comms logger
  (``comms_logger`` in the ds_config, ``prof_all``): the parameter all-gathers of
  the two forwards, by operation; plus the ZO engine's single all-reduce of the
  loss sums (2q+1 float64 values), which goes through torch.distributed and is
  counted from its size;
* the trajectory check: every W must reproduce W=1's losses and g at every step
  and its final weights (within fp32 rounding: relative difference <= 1e-6).

On this 2-core machine W=4 runs 4 ranks on 2 cores, so time per step measures
oversubscription, not a cluster; the bytes and the trajectory check do not
depend on the machine. Writes a section of bench/RESULTS.md and bench/scaling.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: E402  (puts the repository root on sys.path)
import torch

import zo_deepspeed as zd
from zo_deepspeed.distributed import shard_batch

LR, EPS = 1e-5, 1e-3


def ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            # DeepSpeed's own accounting of every collective it issues (the forwards' gathers)
            "comms_logger": {"enabled": True, "verbose": False, "prof_all": True}}


def worker(spec_path: str) -> None:
    """Runs on every rank under the deepspeed launcher."""
    import deepspeed.comm as dscomm
    from transformers import AutoModelForCausalLM

    from zo_deepspeed.partitions import gather_state_dict

    spec = json.load(open(spec_path))
    torch.set_num_threads(1)
    eng = zd.initialize(lambda: AutoModelForCausalLM.from_pretrained(spec["model_dir"]), ds_config(),
                        zd.ZOConfig(lr=LR, eps=EPS, seed=3))
    batches = torch.load(spec["batches"])
    eng.step(shard_batch(batches[0]))  # warm-up: compiles the kernels, first gathers
    dscomm.comms_logger.reset_data()
    times, steps = [], []
    for b in batches[1:]:
        mine = shard_batch(b)
        torch.distributed.barrier()
        t0 = time.perf_counter()
        r = eng.step(mine)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        torch.distributed.all_reduce(dt, op=torch.distributed.ReduceOp.MAX)
        times.append(float(dt))
        steps.append({"loss_plus": r.loss_plus, "loss_minus": r.loss_minus, "g": list(r.g)})
    raw = dscomm.comms_logger.get_raw_data()
    comm = {op: sum(size * rec[0] for size, rec in sizes.items()) for op, sizes in raw.items()}
    counts = {op: sum(rec[0] for rec in sizes.values()) for op, sizes in raw.items()}
    eng.flush()
    sd = gather_state_dict(eng.module)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank == 0:
        torch.save({k: v.float() for k, v in sd.items()}, spec["out"] + ".pt")
        json.dump({"times": times, "steps": steps, "comm_bytes": comm, "comm_counts": counts, "world": world,
                   "kind": eng.parts.kind, "local_numel": eng.parts.local_numel(), "q": eng.zo.q},
                  open(spec["out"] + ".json", "w"))
    torch.distributed.barrier()


def run_world(world: int, model_dir: Path, batches: Path, tmp: Path) -> dict:
    spec = {"model_dir": str(model_dir), "batches": str(batches), "out": str(tmp / f"w{world}")}
    (tmp / f"spec{world}.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
           str(C.free_port()), str(Path(__file__).resolve()), "--worker", str(tmp / f"spec{world}.json")]
    t = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    print(f"  W={world}: launcher exited {p.returncode} after {time.time() - t:.0f} s", flush=True)
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(f"scaling: world size {world} failed (exit {p.returncode})")
    return json.load(open(tmp / f"w{world}.json"))


def plot(points: dict[int, tuple[float, float, float]], png: Path) -> Path | None:
    """points: W -> (s / step, DeepSpeed collective bytes / step / rank, loss all-reduce bytes / step)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ws = sorted(points)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(ws, [points[w][0] for w in ws], "o-")
    ax[0].set(xlabel="world size (gloo ranks, 1 thread each, 2-core machine)", ylabel="s / ZO step",
              title="time per step", xticks=ws, ylim=(0, None))
    multi = [w for w in ws if points[w][1] > 0]  # W=1 gathers nothing (0 bytes: off a log axis)
    ax[1].plot(multi, [points[w][1] for w in multi], "o-", label="DeepSpeed all-gathers (0 at W=1)")
    ax[1].plot(ws, [points[w][2] for w in ws], "s--", label="ZO loss all-reduce")
    ax[1].set(xlabel="world size", ylabel="bytes / step / rank", title="communication", xticks=ws, yscale="log")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-125m", choices=C.MODELS)
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (smaller, faster)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    info = C.machine()
    tmp = Path(tempfile.mkdtemp(prefix="zo_scaling_"))
    model = C.build_model(args.model, torch.float32, layers=args.layers)
    model.save_pretrained(tmp / "model")
    n = C.n_params(model)
    vocab = model.config.vocab_size
    del model
    torch.save([C.make_batch(vocab, args.batch, args.seq, seed=s) for s in range(args.steps + 1)], tmp / "b.pt")
    res = {w: run_world(w, tmp / "model", tmp / "b.pt", tmp) for w in args.worlds}

    ref_w = args.worlds[0]
    ref, ref_sd = res[ref_w], torch.load(tmp / f"w{ref_w}.pt")
    rows = []
    for w, o in res.items():
        dl = max(abs(a["loss_plus"] - b["loss_plus"]) / abs(b["loss_plus"]) for a, b in zip(o["steps"], ref["steps"]))
        dg = max(abs(x - y) / max(abs(y), 1e-12) for a, b in zip(o["steps"], ref["steps"]) for x, y in zip(a["g"], b["g"]))
        sd = torch.load(tmp / f"w{w}.pt")
        dw = max(((sd[k] - v).norm() / v.norm().clamp_min(1e-12)).item() for k, v in ref_sd.items())
        same = dl <= 1e-6 and dw <= 1e-6
        gathers = sum(b for op, b in o["comm_bytes"].items() if "gather" in op) / len(o["times"])
        other = sum(b for op, b in o["comm_bytes"].items() if "gather" not in op) / len(o["times"])
        allreduce = 8 * (2 * o["q"] + 1)
        ops = ", ".join(f"{op} x{o['comm_counts'][op] // len(o['times'])}" for op in sorted(o["comm_bytes"]))
        rows.append([w, o["kind"], f"{o['local_numel'] / 1e6:.1f} M", C.med(o["times"]), C.spread(o["times"]),
                     f"{gathers / 2**20:.1f}", f"{other / 2**20:.3f}", allreduce, ops or "-",
                     f"{dl:.1e} / {dg:.1e} / {dw:.1e}", "same" if same else "DIFFERENT"])
        print(rows[-1], flush=True)
    t = C.table(["W", "layout", "local params", "s / step (median)", "min..max", "DS collectives MiB / step / rank "
                 "(all-gathers)", "other DS collectives MiB / step", "loss all-reduce B / step",
                 "DeepSpeed ops per step", f"vs W={ref_w}: loss / g / weights rel. diff", "trajectory"], rows)
    print("\n" + t)
    png = None if args.no_write else plot(
        {w: (C.med(o["times"]), sum(o["comm_bytes"].values()) / len(o["times"]), 8 * (2 * o["q"] + 1))
         for w, o in res.items()}, C.BENCH / "scaling.png")
    body = (f"{args.model}-shaped model ({n / 1e6:.1f} M parameters, fp32, random init saved once and loaded by every "
            f"run), ZeRO-3 with stage3_param_persistence_threshold 0, global batch {args.batch} x seq {args.seq} split "
            f"across ranks, lr {LR}, eps {EPS}; 1 warm-up step then {args.steps} timed steps. Time: slowest rank, "
            "each step after a barrier. Collective bytes: DeepSpeed's comms logger (message sizes as it records them: "
            "per rank, the all-gather input partition), per step; the ZO loss all-reduce is the engine's only "
            "collective and is counted from its size. Trajectory: max relative difference of L+ and g at every step "
            f"and of the final weights against W={ref_w}. W > 2 oversubscribes this 2-core machine.\n\n" + t
            + ("\n\n![scaling](scaling.png)\n" if png else "\n"))
    if not args.no_write:
        C.write_section("scaling", "scaling.py: world sizes 1, 2, 4 (time, bytes, same trajectory)", body, info=info)


if __name__ == "__main__":
    main()
