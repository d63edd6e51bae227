"""Time to accuracy: the default job's dev/test accuracy against wall time and against forwards, per ZO method.

Every arm is the CLI itself (``zo-deepspeed train``) on the default job (SmolLM2-135M-Instruct, Rotten Tomatoes
1000 train / 200 dev / 500 test, seed 0, batch 16, the ``choice`` objective), so every arm sees the same examples
in the same batch order (``trainer.batch_indices``: a pure function of (seed, step)). Dev is evaluated every
``--eval-every`` steps and the run keeps its best dev checkpoint (``train.select=dev_metric``), whose test accuracy
is the arm's result; the lr of each method is the one of its sweep with the best dev accuracy, every arm cut to
the budget all of that method's arms ran (so a chosen arm continued further does not win by having more dev points).

Methods (``zo.perturb=forward`` throughout: one stacked forward of K copies of the batch per step):

* ``mezo``   : MeZO-SGD, K = 2 (zo.q=1);
* ``qspsa4`` : q-SPSA batched, q = 4, K = 8 (the update averages the 4 estimates);
* ``fzoo4``  : the FZOO-style estimator, 4 one-sided Rademacher perturbations + the clean model, K = 5; its step
  is normalised by the losses' spread, so its lr grid sits higher;
* ``prefix`` : prefix tuning (5 tokens; MeZO's lr 1e-2 / eps 1e-1 scale);
* ``lora``   : LoRA (r 8; MeZO's eps 1e-2 scale).

"forwards" counts model evaluations of one batch (steps x K), the unit the ZO literature compares; wall time is
that of this machine, measured by each run's metrics.jsonl. The backprop + AdamW reference of bench/long_run
(same data and batch order) is drawn next to them when its metrics are there.

    python bench/time_to_accuracy.py sweep --forwards 160 --eval-forwards 40 --jobs 2 --threads 1 --set data.num_dev=200
    python bench/time_to_accuracy.py sweep --steps 400 --eval-every 50 [--methods mezo,fzoo4]   # equal steps instead
    python bench/time_to_accuracy.py sweep --chosen --forwards 400 --eval-forwards 40 --jobs 2 --threads 1 \
        --set data.num_dev=200   # then each method's tuned lr only, continued to a larger budget
    python bench/time_to_accuracy.py report      # table into RESULTS.md, plots/time_to_accuracy.png

``--forwards F`` gives every arm the same budget of forwards (steps = F / K, dev every ``--eval-forwards`` / K
steps): the comparison the ZO literature makes, and the one that costs the same machine time per arm.
``sweep`` is resumable: a finished arm (summary.json) is skipped, an interrupted one continues with ``--resume``,
and a finished arm given a larger budget continues from its last checkpoint (the lr schedule is constant, so
that equals a longer run from the start). Checkpoints are gitignored; what is committed (trajectory.jsonl,
metrics.jsonl, summary.json) rebuilds the weights with ``zo-deepspeed replay``. Each arm's console goes to
``<arm>.console.log`` beside its run directory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import _common as C  # noqa: E402  (puts the repository root on sys.path)
import long_run  # noqa: E402  (the owner of bench/long_run's arm format: the backprop reference is read with it)
from zo_deepspeed.monitor import read_metrics  # noqa: E402  (the owner of metrics.jsonl)

OUT = C.BENCH / "time_to_accuracy"
PLOT = C.BENCH / "plots" / "time_to_accuracy.png"

# name -> (overrides, K blocks per step, lr grid)
METHODS: dict[str, tuple[tuple[str, ...], int, tuple[float, ...]]] = {
    "mezo": (("zo.q=1",), 2, (2e-6, 5e-6, 1e-5, 3e-5, 1e-4)),
    "qspsa4": (("zo.q=4",), 8, (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 3e-4, 1e-3)),
    "fzoo4": (("zo.estimator=fzoo", "zo.q=4", "zo.distribution=rademacher"), 5, (2e-5, 5e-5, 1e-4, 3e-4, 1e-3, 3e-3)),
    "prefix": (("adapter.mode=prefix",), 2, (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    "lora": (("adapter.mode=lora",), 2, (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)),
}


def arm_dir(method: str, lr: float, out: Path = OUT) -> Path:
    return Path(out) / f"{method}_lr{lr:g}"


def arm_steps(method: str, args) -> tuple[int, int]:
    """(train.steps, train.eval_every) of an arm: equal steps (--steps) or an equal forward budget (--forwards)."""
    K = METHODS[method][1]
    if not args.forwards:
        return args.steps, args.eval_every
    if args.forwards % K or args.eval_forwards % K:
        raise SystemExit(f"time_to_accuracy: --forwards {args.forwards} and --eval-forwards {args.eval_forwards} "
                         f"must be multiples of {method}'s K = {K}; pick multiples of 40 (K is 2, 5 or 8)")
    return args.forwards // K, args.eval_forwards // K


def run_arm(method: str, lr: float, args) -> None:
    out = arm_dir(method, lr, args.out)
    steps, eval_every = arm_steps(method, args)
    summary = out / "summary.json"
    if summary.exists() and json.loads(summary.read_text())["steps"] >= steps:
        print(f"[time_to_accuracy] {out.name}: done, skipped", flush=True)
        return
    overrides, _, _ = METHODS[method]
    argv = ["train", f"train.steps={steps}", f"train.eval_every={eval_every}",
            "train.select=dev_metric", "train.keep_checkpoints=1", f"train.save_every={eval_every}",
            f"train.output_dir={out}", "train.export=false", "train.zero_shot_eval=false", "zo.perturb=forward",
            f"zo.lr={lr:g}", *overrides, *args.set]
    # an interrupted arm, or a finished one given a larger budget (the lr schedule is constant, so the longer
    # run's first steps are this run's steps: continuing it is the same as having asked for more at the start)
    if (out / "trajectory.jsonl").exists():
        argv.append("--resume")
    cmd = [sys.executable, "-m", "zo_deepspeed", *argv]
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=str(args.threads))
    t0 = time.time()
    console = out.with_name(out.name + ".console.log")  # beside the run dir: the trainer owns what is inside
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "a") as log:  # parallel arms: each arm's console in its own file
        rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"time_to_accuracy: arm {out.name} failed (exit {rc}, see {console}); "
                         "rerun sweep to resume it")
    walls = json.loads((out / "wall.json").read_text())["stretches"] if (out / "wall.json").exists() else []
    (out / "wall.json").write_text(json.dumps({"stretches": walls + [{"wall_s": time.time() - t0, "argv": argv,
                                                                       "threads": args.threads}]}))
    print(f"[time_to_accuracy] {out.name}: finished in {time.time() - t0:.0f} s", flush=True)
    # checkpoints stay (gitignored): a larger --forwards continues the arm from them instead of rerunning it


def sweep(args) -> None:
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"time_to_accuracy: unknown method {unknown[0]!r}; use {', '.join(METHODS)}")
    # lr-major: every method's first lr before any second one, so a stopped sweep still covers every method
    arms = [(m, METHODS[m][2][i]) for i in range(max(len(METHODS[m][2]) for m in methods)) for m in methods
            if i < len(METHODS[m][2])]
    if args.chosen:  # only each method's tuned lr, e.g. to give it a larger --forwards once the grid has run
        chosen = {m: tune(m, args.out) for m in methods}
        missing = [m for m, t in chosen.items() if t is None]
        if missing:
            raise SystemExit(f"time_to_accuracy: --chosen needs {missing[0]}'s grid finished first; "
                             "run sweep without --chosen")
        arms = [(m, chosen[m].lr) for m in methods]
    for m in methods:
        arm_steps(m, args)  # refuse a budget that does not divide before any arm runs
    # arms are independent processes: --jobs of them at a time, each with --threads OMP threads
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_arm, m, lr, args) for m, lr in arms]
        try:
            for f in futures:
                f.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the running arms finish; no new one starts
            raise


def load_arm(d: Path) -> dict | None:
    """One arm's dev curve (step, wall s since its first step, dev accuracy), summary and s/step; None if unfinished."""
    if not (d / "summary.json").exists():
        return None
    recs, _ = read_metrics(d / "metrics.jsonl")  # a torn last line (a crash mid-write) is skipped
    # a resume runs again the steps past its checkpoint (all of them when the checkpoints are gone, e.g. in a
    # fresh checkout). The trainer now cuts metrics.jsonl back to the checkpoint (monitor.truncate), but the
    # committed arms were logged before it did, with each rerun step appended again: the last record of a
    # step is the one the final weights went through, so it supersedes the earlier ones
    last = {}
    for r in recs:
        if "loss" in r or "dev/accuracy" in r:
            last["loss" in r, r["step"]] = r
    steps = sorted((r for (is_step, _), r in last.items() if is_step), key=lambda r: r["step"])
    span = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
    med = statistics.median(x for x in span if x > 0) if any(x > 0 for x in span) else float("nan")
    # wall time since the first step, without the time between stretches: a gap a step (with its dev
    # evaluation) cannot take, or a jump backwards, counts as one median step
    clock, t, prev = {}, med if med == med else 0.0, None
    for r in steps:
        if prev is not None:
            dt = r["time"] - prev
            t += dt if 0 < dt < max(600.0, 20 * med) else med
        clock[r["step"]], prev = t, r["time"]
    at = {r["step"]: r["time"] for r in steps}  # a dev evaluation runs after its step's record
    dev = sorted(((s, clock[s] + r["time"] - at[s], r["dev/accuracy"])
                  for (is_step, s), r in last.items() if not is_step and s in clock), key=lambda x: x[0])
    return {"summary": json.loads((d / "summary.json").read_text()), "dev": dev, "s_per_step": med}


@dataclass(frozen=True)
class Tuning:
    """A method's lr choice: the grid's best dev accuracy per lr, every arm cut to the budget all of them ran."""

    lr: float
    arms: dict  # lr -> load_arm() of each finished arm
    best_dev: dict  # lr -> best dev accuracy within `steps`
    steps: int  # the common budget in steps (the shortest finished arm's)


def tune(method: str, out: Path = OUT) -> Tuning | None:
    """The lr with the best dev accuracy at the budget every finished arm of `method` ran (None: none finished).

    Cutting to the common budget keeps the choice fair once the chosen arm has been given a larger one (``sweep
    --chosen``): a longer arm has more dev points to take a maximum over."""
    arms = {lr: load_arm(arm_dir(method, lr, out)) for lr in METHODS[method][2]}
    done = {lr: a for lr, a in arms.items() if a is not None}
    if not done:
        return None
    steps = min(a["summary"]["steps"] for a in done.values())
    best_dev = {lr: max(v for s, _, v in a["dev"] if s <= steps) for lr, a in done.items()}
    lr = max(done, key=lambda x: best_dev[x])  # a tie goes to the first (smallest) lr of the grid
    return Tuning(lr, done, best_dev, steps)


def report(args) -> None:
    rows, curves = [], {}
    for m, (overrides, K, lrs) in METHODS.items():
        t = tune(m, args.out)
        if t is None:
            continue
        lr, a = t.lr, t.arms[t.lr]
        best = max(v for _, _, v in a["dev"])  # over the chosen arm's whole run, which may be longer
        res = a["summary"]["results"]
        test_best = res.get("best", res["final"])["value"]
        sweep_txt = f"at {t.steps * K} forwards: " + ", ".join(f"{x:g}: {t.best_dev[x]:.3f}" for x in lrs
                                                              if x in t.arms) + \
            ("" if len(t.arms) == len(lrs) else f" ({len(lrs) - len(t.arms)} unfinished)")
        to80 = next((s * K for s, _, v in a["dev"] if v >= 0.80), None)  # forwards to dev accuracy 0.80
        to_best = next(s * K for s, _, v in a["dev"] if v == best)  # forwards to the best dev point
        at_best = next((t, v) for s, t, v in a["dev"] if v == best)
        rows.append((m, K, lr, best, test_best, res["final"]["value"], a["summary"]["steps"],
                     a["summary"]["steps"] * K, a["s_per_step"], to80, to_best, at_best[0] / 60, sweep_txt,
                     " ".join(overrides)))
        curves[m] = (K, a["dev"], (to_best, at_best[0], test_best))  # test is measured at the dev-chosen point only
    if not rows:
        raise SystemExit(f"time_to_accuracy: no finished arm under {args.out}; run sweep first")
    ref = next((r for r in rows if r[0] == "mezo"), None)  # the ratios are against MeZO-SGD's forwards

    def ratio(x, y):
        return f"{x / y:.2f}" if x is not None and y else "-"

    table = ["| method | K | lr (chosen) | best dev acc | test at best dev | test final | steps | forwards | s/step | "
             "forwards to dev 0.80 (/ MeZO) | forwards to best dev (/ MeZO) | wall to best dev (min) | "
             "dev acc per lr | overrides |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {m} | {K} | {lr:g} | {dv:.3f} | {tb:.3f} | {tf:.3f} | {st} | {fw} | {sps:.2f} | "
              f"{t80 if t80 is not None else 'not reached'} ({ratio(t80, ref[9] if ref else None)}) | "
              f"{tb_} ({ratio(tb_, ref[10] if ref else None)}) | {wb:.0f} | {sw} | `{ov}` |"
              for m, K, lr, dv, tb, tf, st, fw, sps, t80, tb_, wb, sw, ov in rows]
    bp = _backprop()
    if bp is not None:  # a forward and a backward per step: its "forwards" column counts steps, not comparable
        arm, dev = bp
        steps, best = len(arm["loss"]), max(v for _, _, v in dev)
        t80 = next((s for s, _, v in dev if v >= 0.80), None)
        table.append(f"| backprop (bench/long_run, {arm['settings']}) | - | {arm['wall']['lr']:g} | {best:.3f} | "
                     f"- | {arm['test'][-1][1]:.3f} | {steps} | {steps} fwd+bwd | {arm['s_per_step']:.2f} | "
                     f"{t80 if t80 is not None else 'not reached'} fwd+bwd (-) | "
                     f"{next(s for s, _, v in dev if v == best)} fwd+bwd (-) | "
                     f"{next(t for _, t, v in dev if v == best) / 60:.0f} | - | `python bench/long_run.py backprop` |")
    print("\n".join(table))
    if args.no_write:
        return
    _plot(curves, bp[1] if bp is not None else None, bp[0]["test"][0][1] if bp is not None else None)
    notes = Path(args.notes).read_text() if args.notes else ""
    C.write_section("time_to_accuracy", "Time to accuracy: ZO methods on the default job",
                    "\n".join(table) + f"\n\n![time to accuracy](plots/{PLOT.name})\n" + ("\n" + notes if notes else ""))


def _backprop() -> tuple[dict, list] | None:
    """bench/long_run's backprop + AdamW reference (same data and batch order), as long_run.load reads it, and its
    dev curve (step, wall s since its zero-shot evaluation, accuracy); None if it is not there."""
    if not (long_run.OUT / "backprop" / "metrics.jsonl").exists():
        return None
    arm = long_run.load("backprop")
    t0 = arm["recs"][0]["time"]
    return arm, [(r["step"], r["time"] - t0, r["dev/accuracy"]) for r in arm["recs"] if "dev/accuracy" in r]


def _plot(curves: dict, backprop_dev: list | None, untuned_test: float | None) -> None:
    """Dev accuracy against wall time and forwards, and each method's test accuracy at its best dev checkpoint as
    a star: as in MeZO, test is evaluated only at the checkpoint dev selects, so there is no test curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_w, ax_f) = plt.subplots(1, 2, figsize=(14, 5))
    for i, (m, (K, dev, (fw_best, t_best, test))) in enumerate(curves.items()):
        c = f"C{i}"
        ax_w.plot([t / 60 for _, t, _ in dev], [v for *_, v in dev], marker="o", color=c, label=f"{m}: dev")
        ax_f.plot([s * K for s, _, _ in dev], [v for *_, v in dev], marker="o", color=c, label=f"{m}: dev")
        ax_w.plot([t_best / 60], [test], marker="*", ms=13, color=c, ls="none")
        ax_f.plot([fw_best], [test], marker="*", ms=13, color=c, ls="none", label=f"{m}: test at best dev")
    if untuned_test is not None:
        for ax in (ax_w, ax_f):
            ax.axhline(untuned_test, color="grey", ls=":", label=f"untuned model: test {untuned_test:.3f}")
    if backprop_dev is not None:
        ax_w.plot([t / 60 for _, t, _ in backprop_dev], [v for *_, v in backprop_dev], "k--", label="backprop + AdamW")
    ax_w.set_xlabel("wall time (min, this 2-core CPU)")
    ax_f.set_xlabel("forwards (steps x K)")
    for ax in (ax_w, ax_f):
        ax.set_ylabel("accuracy (dev 200; test 500 at the star)")
        ax.grid(alpha=0.3)
    ax_w.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: the curves fill the axes
    ax_f.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")  # outside: the curves fill the axes
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sw = sub.add_parser("sweep", help="run every method at every lr of its grid (resumable)")
    sw.add_argument("--steps", type=int, default=400)
    sw.add_argument("--eval-every", type=int, default=50)
    sw.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    sw.add_argument("--forwards", type=int, default=0,
                    help="an equal forward budget per arm instead of equal steps: steps = forwards / K")
    sw.add_argument("--eval-forwards", type=int, default=40, help="with --forwards: dev every this many forwards")
    sw.add_argument("--threads", type=int, default=2, help="OMP threads per arm")
    sw.add_argument("--jobs", type=int, default=1, help="arms run at a time (2 on this 2-core machine at 1 thread)")
    sw.add_argument("--chosen", action="store_true",
                    help="run only each method's tuned lr (its grid finished), e.g. with a larger --forwards")
    sw.add_argument("--set", action="extend", nargs="+", default=[], help="extra dotted overrides for every arm")
    rp = sub.add_parser("report", help="table into RESULTS.md and the plot")
    rp.add_argument("--no-write", action="store_true", help="print the table only")
    rp.add_argument("--notes", help="a markdown file appended below the table (how the sweep ran, what it shows)")
    for p in (sw, rp):
        p.add_argument("--out", type=Path, default=OUT, help=f"the arms' run directories (default {OUT})")
    args = ap.parse_args()
    sweep(args) if args.cmd == "sweep" else report(args)


if __name__ == "__main__":
    main()
