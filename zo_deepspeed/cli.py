"""``zo-deepspeed`` command line: train, eval, replay, export, plot, plan.

Works under ``deepspeed``, ``torchrun`` and plain ``python -m zo_deepspeed``
(a world of one). Bad input ends with one line naming the problem and its fix
and a non-zero exit status, not a traceback.
"""
from __future__ import annotations

import argparse
import json
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
    ev = sub.add_parser("eval", help="evaluate a model on a task's test split")
    ev.add_argument("--config")
    ev.add_argument("--ds-config")
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd is None:
        _parser().print_help()
        return 2
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    from .console import quiet_known_noise

    quiet_known_noise()
    try:
        return {"train": _train, "eval": _eval, "replay": _replay, "export": _export, "plot": _plot,
                "plan": _plan}[args.cmd](args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as e:
        if os.environ.get("ZO_DEEPSPEED_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"zo-deepspeed {args.cmd}: error: {msg}", file=sys.stderr)
        return 2


def _load_cfg(args, resume: bool = False):
    from .run_config import load_run_config, load_saved_run_config

    overrides = list(args.overrides)
    if getattr(args, "ds_config", None):
        overrides.append(f"deepspeed={args.ds_config}")
    if resume and args.config is None:  # the run's own config.json, read in memory
        out = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir=")), "runs/default")
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
        print(f"fine-tuned {f.metric}: {f.value:.4f}  ({tr.engine.step_count} ZO steps; run dir {tr.run_dir})")
    return 0


def _eval(args) -> int:
    from .build import build_engine, prepare_run
    from .evaluate import Evaluator

    cfg = _load_cfg(args)
    s = prepare_run(cfg)
    eng = build_engine(s)
    res = Evaluator(eng, s.task, s.tokenizer, cfg.data.max_length, cfg.train.eval_batch_size).evaluate(
        "test", s.splits["test"])
    if s.is_main:
        print(f"{res.metric}: {res.value:.4f} on {res.n} examples")
    return 0


def _replay(args) -> int:
    from transformers import AutoModelForCausalLM

    from . import distributed
    from .build import build_ds_config, load_tokenizer, resolve_model_path
    from .checkpoint import export_hf
    from .engine import replay
    from .run_config import RunConfig, TrainConfig
    from .trajectory import read_log

    path = resolve_model_path(args.model)
    # verified (format, z stream, contiguous steps, base fingerprint) before any model is built
    _, records = read_log(args.log, base=path)
    _, world = distributed.setup()
    rc = RunConfig(train=TrainConfig(batch_size=world), deepspeed=args.ds_config)
    eng = replay(lambda: AutoModelForCausalLM.from_pretrained(path), args.log, build_ds_config(rc, world, None),
                 base=path)
    export_hf(eng, Path(args.out), load_tokenizer(path))
    if eng.rank == 0:
        print(f"replayed {len(records)} steps onto {path} -> {args.out}")
    return 0


def _export(args) -> int:
    from .build import build_engine, prepare_run
    from .checkpoint import export_hf, latest_checkpoint, resume

    run = Path(args.run_dir)
    if latest_checkpoint(run) is None:
        raise FileNotFoundError(f"{run} has no checkpoint (checkpoints/latest); train first or pass the run dir")
    from .run_config import load_saved_run_config

    cfg = load_saved_run_config(run / "config.json")
    s = prepare_run(cfg)
    eng = build_engine(s)
    info = resume(eng, run)
    export_hf(eng, Path(args.out), s.tokenizer)
    if s.is_main:
        print(f"exported step {info.step} of {run} -> {args.out}")
    return 0


def _plan(args) -> int:
    from .planner import run

    return run(args)


def _plot(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(args.run_dir)
    mpath = run / "metrics.jsonl"
    if not mpath.exists():
        raise FileNotFoundError(f"{mpath} not found; pass a run directory written by zo-deepspeed train")
    recs = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r]
    evals = {k: [(r["step"], r[k]) for r in recs if k in r] for k in {k for r in recs for k in r if "/" in k}}
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
            pts = [(r["step"], r[k]) for r in steps if k in r]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, label=k)
        ax.set(title=title, xlabel="step")
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    out = Path(args.out) if args.out else run / "curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0
