"""``zo-deepspeed`` command line: train, eval, replay, export, plot, plan, mezo.

Works under ``deepspeed``, ``torchrun`` and plain ``python -m zo_deepspeed``
(a world of one). Bad input ends with one line naming the problem and its fix
and a non-zero exit status, not a traceback.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .run_config import config_help

    ap = argparse.ArgumentParser(prog="zo-deepspeed", description="Zeroth-order fine-tuning on DeepSpeed ZeRO-3.")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    sub = ap.add_subparsers(dest="cmd")
    tr = sub.add_parser("train", help="fine-tune (no arguments: the embedded default job)",
                        epilog=config_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--config", help="YAML/JSON run config")
    tr.add_argument("--ds-config", help="DeepSpeed config JSON (default: embedded ZeRO-3)")
    tr.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its checkpoint")
    tr.add_argument("overrides", nargs="*", help="section.key=value")
    ev = sub.add_parser("eval", help="evaluate a model on a task's test split (zero-shot, in-context, calibrated)")
    ev.add_argument("--config")
    ev.add_argument("--ds-config")
    ev.add_argument("--demos", type=int, default=0, help="in-context demonstrations per test example, drawn from the "
                    "train split with zo.seed as MeZO draws them (0: zero-shot; MeZO's ICL row: 32)")
    ev.add_argument("--calibrate", choices=("none", "sfc", "icl_sfc"), default="none",
                    help="calibration (surface-form competition): sfc (MeZO's --sfc) or icl_sfc (--icl_sfc)")
    ev.add_argument("--out", help="also write the result as JSON to this file")
    ev.add_argument("overrides", nargs="*")
    rp = sub.add_parser("replay", help="base model + trajectory log -> HF folder")
    rp.add_argument("--model", required=True, help="base model folder (or 'default')")
    rp.add_argument("--log", required=True, help="trajectory.jsonl of a run")
    rp.add_argument("--out", required=True, help="output HF folder")
    rp.add_argument("--ds-config")
    ex = sub.add_parser("export", help="run directory (latest checkpoint) -> HF folder")
    ex.add_argument("--run-dir", required=True)
    ex.add_argument("--out", required=True)
    pl = sub.add_parser("plot", help="run directory -> PNG of loss, g and accuracy")
    pl.add_argument("--run-dir", required=True)
    pl.add_argument("--out", default=None)
    from .planner import add_arguments as _plan_arguments

    _plan_arguments(sub.add_parser("plan", help="memory per GPU and per node, and the ds_config to use"))
    from .recipe import add_arguments as _mezo_arguments

    _mezo_arguments(sub.add_parser("mezo", help="the MeZO paper's protocol over tasks, modes, the lr grid and seeds; "
                                   "one results table", formatter_class=argparse.RawDescriptionHelpFormatter))
    return ap


# Expected failures: bad input, a refused write, a damaged file, the file system. Each ends as one line
# ``zo-deepspeed CMD: error: ...`` and exit 2; anything else is a bug and keeps its traceback.
EXPECTED = (ValueError, OSError, RuntimeError)
EXIT_ERROR, EXIT_INTERRUPTED = 2, 130
_OS_FIXES = {
    errno.ENOSPC: "free some space (or pick another train.output_dir); a training run continues with --resume",
    errno.EDQUOT: "free some space within your quota; a training run continues with --resume",
    errno.EROFS: "the file system is read-only: pick a writable folder",
    errno.EACCES: "pick a folder you may write (or fix its permissions)",
    errno.EPERM: "pick a folder you may write (or fix its permissions)",
    errno.EISDIR: "it is a directory where a file is expected: pass a file",
    errno.ENOTDIR: "a part of it is a file where a directory is expected: pass a folder path",
    errno.ENOENT: "check the path",
}


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        where = f" {e.filename}" if e.filename else ""
        fix = _OS_FIXES.get(e.errno, "check the path and the file system")
        return f"{e.strerror}:{where}; {fix}" if "[Errno" in str(e) else f"{str(e).splitlines()[0]}; {fix}"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd is None:
        _parser().print_help()
        return EXIT_ERROR
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from .console import quiet_known_noise

    quiet_known_noise()
    try:
        return {"train": _train, "eval": _eval, "replay": _replay, "export": _export, "plot": _plot,
                "plan": _plan, "mezo": _mezo}[args.cmd](args)
    except EXPECTED as e:
        if os.environ.get("ZO_DEEPSPEED_DEBUG"):
            raise
        print(f"zo-deepspeed {args.cmd}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which checkpoints and exits 130 itself)
        if os.environ.get("ZO_DEEPSPEED_DEBUG"):
            raise
        what = "a resumed run continues from its last checkpoint" if args.cmd == "train" else "nothing was written"
        print(f"zo-deepspeed {args.cmd}: interrupted (Ctrl-C); {what}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _load_cfg(args, resume: bool = False):
    from .run_config import load_run_config, load_saved_run_config

    overrides = list(args.overrides)
    if getattr(args, "ds_config", None):
        overrides.append(f"deepspeed={args.ds_config}")
    if resume and args.config is None:  # the run's own config.json, read in memory
        from .guard import check_run_dir

        out = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("train.output_dir=")),
                   "runs/default")
        check_run_dir(out, resume=True)  # not empty, not the cwd, not a model folder: before reading its config.json
        saved = Path(out) / "config.json"
        if not saved.exists():
            raise FileNotFoundError(f"--resume: {saved} not found; pass the run's train.output_dir")
        return load_saved_run_config(saved, overrides)
    return load_run_config(args.config, overrides)


def _train(args) -> int:
    from .trainer import Trainer

    cfg = _load_cfg(args, resume=args.resume)
    tr = Trainer(cfg, resume=args.resume)
    summary = tr.train()
    if tr.is_main:
        z, f = summary.get("zero_shot"), summary["final"]
        if z is not None:
            print(f"zero-shot {z.metric}: {z.value:.4f}")
        model = f"; model {tr.run_dir / 'export'}" if tr.cfg.train.export else ""
        print(f"fine-tuned {f.metric}: {f.value:.4f}  ({f.step} ZO steps; run dir {tr.run_dir}{model})")
        b = summary.get("best")
        if b is not None and b.step != f.step:  # train.select: the weights MeZO reports
            print(f"at the best dev checkpoint (step {b.step}) {b.metric}: {b.value:.4f}")
    return 0


def _eval(args) -> int:
    from .evaluate import run_eval

    run_eval(_load_cfg(args), demos=args.demos, calibrate=args.calibrate, out=args.out)
    return 0


def _mezo(args) -> int:
    from .recipe import run

    return run(args)


def _replay(args) -> int:
    from transformers import AutoModelForCausalLM

    from . import distributed
    from .build import build_ds_config, check_model_files, load_tokenizer, resolve_model_path
    from .checkpoint import export_hf
    from .engine import replay
    from .guard import check_output_dir
    from .run_config import RunConfig, TrainConfig
    from .trajectory import read_log

    path = resolve_model_path(args.model, key="--model")
    out = check_output_dir(args.out, "--out", inputs=[("base model", path), ("trajectory log", args.log)])
    # verified (format, z stream, contiguous steps, base fingerprint) before any model is built
    _, records = read_log(args.log, base=path)
    check_model_files(path, key="--model")
    _, world = distributed.setup()
    rc = RunConfig(train=TrainConfig(batch_size=world), deepspeed=args.ds_config)
    eng = replay(lambda: AutoModelForCausalLM.from_pretrained(path), args.log, build_ds_config(rc, world, None),
                 base=path)
    export_hf(eng, out, load_tokenizer(path))
    if eng.rank == 0:
        print(f"replayed {len(records)} steps of {args.log} onto {path} -> {out}")
    return 0


def _export(args) -> int:
    from .build import build_engine, prepare_run
    from .checkpoint import export_hf, latest_checkpoint, resume
    from .guard import check_output_dir

    run = Path(args.run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"--run-dir {run} is not a folder; pass the train.output_dir of a run")
    if latest_checkpoint(run) is None:
        raise FileNotFoundError(f"{run} has no checkpoint (checkpoints/latest); train first or pass the run dir")
    out = check_output_dir(args.out, "--out", inputs=[("run directory", run)])
    from .run_config import load_saved_run_config

    cfg = load_saved_run_config(run / "config.json")
    s = prepare_run(cfg, splits=())  # the model and its tokenizer: an export reads no task data
    eng = build_engine(s)
    info = resume(eng, run)
    export_hf(eng, out, s.tokenizer)
    if s.is_main:
        print(f"exported step {info.step} of {run} ({info.path.name}) -> {out}")
    return 0


def _plan(args) -> int:
    from .planner import run

    return run(args)


def _plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .guard import check_output_file

    run = Path(args.run_dir)
    mpath = run / "metrics.jsonl"
    if not mpath.is_file():
        what = "is a directory" if mpath.is_dir() else "not found"
        raise FileNotFoundError(f"{mpath} {what}; pass a run directory written by zo-deepspeed train")
    if args.out is None and not os.access(run, os.W_OK):
        raise ValueError(f"{run} is not writable, so curves.png cannot go there; pass --out FILE.png")
    out = check_output_file(args.out if args.out is not None else run / "curves.png", "--out",
                            inputs=[("metrics file", mpath)])
    recs = _read_metrics(mpath)
    num = lambda r, k: isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)  # noqa: E731
    steps = [r for r in recs if num(r, "loss") and num(r, "g")]
    evals = {k: [(r["step"], r[k]) for r in recs if num(r, k)] for k in {k for r in recs for k in r if "/" in k}}
    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    axes = grid[0]
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8)
    axes[0].set(title="loss (mean of L+ and L-)", xlabel="step")
    axes[1].plot([r["step"] for r in steps], [r["g"] for r in steps], lw=0.6)
    axes[1].set(title="projected gradient g", xlabel="step")
    for k, pts in sorted(evals.items()):
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
    axes[2].set(title="evaluation", xlabel="step")
    axes[2].legend()
    # the step profile (zo_deepspeed/profile.py): time, gathered bytes, peak memory per step
    panels = [("time per step (s)", ("time/forward_s", "time/edit_s")),
              ("gathered per step (GiB)", ("comm/gathered_gib",)),
              ("peak memory (GiB)", ("memory/peak_device_gib", "memory/peak_rss_gib"))]
    for ax, (title, keys) in zip(grid[1], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in steps if num(r, k)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=k)
        ax.set(title=title, xlabel="step")
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")  # a temporary sibling, renamed into place
    try:
        fig.savefig(tmp, dpi=110, format=out.suffix[1:].lower())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} ({len(steps)} steps of {mpath})")
    return 0


def _read_metrics(mpath: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (monitor.read_metrics), with a note for a torn last line."""
    from .monitor import read_metrics

    recs, torn = read_metrics(mpath)
    if torn:
        print(f"zo-deepspeed plot: note: {mpath}: skipped a torn last line (a crash mid-write)", file=sys.stderr)
    if not recs:
        raise ValueError(f"{mpath} holds no records yet; plot a run that has taken steps")
    return recs
