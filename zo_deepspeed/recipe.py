"""The ``mezo`` recipe: the MeZO paper's protocol (Malladi et al., 2023, Table 1; princeton-nlp/MeZO
``large_models/mezo.sh`` and ``icl.sh``), one command per task, and one results table across tasks, modes and seeds.

    zo-deepspeed mezo --tasks sst2 --data-dir /data/SST-2 --out results/mezo            # ft, lora, prefix grid
    zo-deepspeed mezo --tasks rte,cb,copa --data-root /data/superglue --seeds 0,1,2,3,4 --out results/mezo
    zo-deepspeed mezo --tasks sst2 --modes zs,icl --data-dir /data/SST-2 --out results/mezo   # the baselines
    zo-deepspeed mezo --list ...            # the grid, one run per line (index, name)
    zo-deepspeed mezo --index 7 ...         # one run of the grid (launch/mezo_array.sbatch: one per array task)
    zo-deepspeed mezo --table --out results/mezo   # only rewrite results.csv and results.md

Each training run is ``zo-deepspeed train`` with MeZO's settings: 20,000 steps at batch 16, constant lr, no weight
decay, dev evaluated every 4,000 steps, test reported at the checkpoint of lowest dev loss (mezo.sh:5-13, 54-66;
``train.select=dev_loss``) and at the end; the task's data defaults (:mod:`zo_deepspeed.tasks.protocol`). The lr/eps
grid is MeZO's (paper Appendix D): full-parameter lr 1e-6, 1e-7 with eps 1e-3; LoRA lr 1e-4, 5e-5 with eps 1e-2;
prefix lr 1e-2, 1e-3 with eps 1e-1. The baselines are ``zo-deepspeed eval``: zero-shot (``zs``) and in-context with
32 demonstrations (``icl``, icl.sh). Extra ``section.key=value`` arguments go to every run (they win over the
recipe's), e.g. ``model.dtype=bfloat16 --ds-config ...`` belongs in them as ``deepspeed=ds_configs/...json``.

A run writes into ``OUT/NAME/``; a finished one (its ``summary.json`` exists) is skipped, an interrupted one is
resumed (``train --resume``). After its runs the recipe rewrites ``OUT/results.csv`` (one row per run) and
``OUT/results.md`` (per task and mode: the mean and spread over seeds of the test metric at the best dev
checkpoint, at the lr whose mean best dev loss is lowest; and every run).
"""
from __future__ import annotations

import csv
import json
import math
import shlex
import signal
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GRID", "BASELINES", "TABLE1_TASKS", "Run", "grid", "add_arguments", "run", "write_table"]

# mode -> (adapter.mode, lr grid, eps): MeZO Appendix D (and README "MeZO (full-parameter, prefix-tuning, and LoRA)")
GRID = {"ft": ("none", (1e-6, 1e-7), 1e-3), "lora": ("lora", (1e-4, 5e-5), 1e-2),
        "prefix": ("prefix", (1e-2, 1e-3), 1e-1)}
BASELINES = {"zs": 0, "icl": 32}  # demonstrations (icl.sh --num_train 32; zero-shot: --num_train 0)
STEPS, EVAL_EVERY, BATCH = 20000, 4000, 16  # mezo.sh:5, 12-13
TABLE1_TASKS = ("sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop")
# folder names a task's files come in (--data-root): the official archives' and common ones
DATA_DIR_NAMES = {"sst2": ("SST-2", "SST2"), "rte": ("RTE",), "cb": ("CB",), "boolq": ("BoolQ",), "wsc": ("WSC",),
                  "wic": ("WiC",), "multirc": ("MultiRC",), "copa": ("COPA", "Copa"), "record": ("ReCoRD",),
                  "squad": ("SQuAD", "squad", "SQuAD1.1"), "drop": ("drop_dataset", "DROP")}
MODE_ORDER = ("zs", "icl", "ft", "lora", "prefix")
EXIT_PREEMPTED = 75


@dataclass(frozen=True)
class Run:
    task: str
    mode: str
    seed: int
    lr: float | None = None
    eps: float | None = None
    data_dir: str | None = None

    @property
    def name(self) -> str:
        if self.mode in BASELINES:
            return f"{self.task}-{self.mode}-seed{self.seed}"
        return f"{self.task}-{self.mode}-lr{self.lr:g}-eps{self.eps:g}-seed{self.seed}"

    def command(self, out: Path, args, launch: list[str]) -> list[str]:
        """The zo-deepspeed command line of this run (``launch`` runs the package: python -m zo_deepspeed, or a
        deepspeed/torchrun launcher with --module zo_deepspeed)."""
        d = out / self.name
        common = [f"data.task={self.task}", f"zo.seed={self.seed}", "data.answer_first_line=false"]
        if self.data_dir:
            common.append(f"data.data_dir={self.data_dir}")
        if args.model:
            common.append(f"model.path={args.model}")
        if self.mode in BASELINES:
            demos = BASELINES[self.mode] if self.mode == "zs" else args.demos
            return [*launch, "eval", "--demos", str(demos), "--out", str(d / "summary.json"), *common,
                    *args.overrides]
        if (d / "trajectory.jsonl").exists():  # interrupted: continue it (its config.json holds the rest)
            return [*launch, "train", "--resume", f"train.output_dir={d}"]
        adapter = GRID[self.mode][0]
        return [*launch, "train", *common, f"adapter.mode={adapter}", f"zo.lr={self.lr:g}", f"zo.eps={self.eps:g}",
                "zo.lr_schedule=constant", "zo.weight_decay=0", f"train.steps={args.steps}",
                f"train.eval_every={args.eval_every}", "train.select=dev_loss", f"train.batch_size={args.batch_size}",
                "train.zero_shot_eval=false", "train.export=false", "train.keep_checkpoints=1",
                f"train.output_dir={d}", *args.overrides]


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _data_dirs(args, tasks: list[str]) -> dict[str, str | None]:
    """task -> its data folder: --data-dir PATH (one task) or TASK=PATH, else the matching folder of --data-root."""
    out: dict[str, str | None] = {t: None for t in tasks}
    for spec in args.data_dir or []:
        task, sep, path = spec.partition("=")
        if not sep:
            if len(tasks) != 1:
                raise ValueError(f"--data-dir {spec}: with several tasks write --data-dir TASK=PATH")
            task, path = tasks[0], spec
        if task not in out:
            raise ValueError(f"--data-dir {spec}: {task} is not among --tasks")
        out[task] = path
    if args.data_root:
        root = Path(args.data_root)
        if not root.is_dir():
            raise FileNotFoundError(f"--data-root {root} is not a directory")
        norm = lambda s: s.lower().replace("-", "").replace("_", "").replace(".", "")  # noqa: E731
        present = {norm(p.name): p for p in root.iterdir() if p.is_dir()}
        for t in tasks:
            if out[t] is None:
                hit = next((present[norm(n)] for n in (t, *DATA_DIR_NAMES.get(t, ())) if norm(n) in present), None)
                out[t] = str(hit) if hit else None
    return out


def grid(args) -> list[Run]:
    """Every run of the recipe, in a fixed order (task, mode, lr, seed): what --index counts."""
    from .tasks import get_task

    tasks = _csv(args.tasks)
    if not tasks:
        raise ValueError("mezo: name the tasks, e.g. --tasks sst2,rte (MeZO's Table 1: " + ",".join(TABLE1_TASKS) + ")")
    tasks = [get_task(t).name for t in tasks]
    modes = _csv(args.modes)
    bad = [m for m in modes if m not in GRID and m not in BASELINES]
    if bad or not modes:
        raise ValueError(f"mezo: unknown mode {bad[0] if bad else '(none)'}; use {', '.join(MODE_ORDER)}")
    seeds = [int(s) for s in _csv(args.seeds)]
    dirs = _data_dirs(args, tasks)
    runs = []
    for t in tasks:
        if dirs[t] is None and t != "rotten_tomatoes":
            raise ValueError(f"mezo: no data folder for {t}: pass --data-dir {t}=PATH or a --data-root holding "
                             f"{'/'.join((t,) + DATA_DIR_NAMES.get(t, ()))}")
        for m in modes:
            if m in BASELINES:
                runs += [Run(t, m, s, data_dir=dirs[t]) for s in seeds]
                continue
            lrs = [float(x) for x in _csv(args.lr)] or list(GRID[m][1])
            eps = float(args.eps) if args.eps else GRID[m][2]
            runs += [Run(t, m, s, lr, eps, dirs[t]) for lr in lrs for s in seeds]
    return runs


def add_arguments(p) -> None:
    p.description = __doc__.split("\n\n")[0]
    p.epilog = "\n\n".join(__doc__.split("\n\n")[1:])
    p.add_argument("--tasks", help="comma-separated tasks (MeZO's Table 1: " + ",".join(TABLE1_TASKS) + ")")
    p.add_argument("--data-dir", action="append", metavar="[TASK=]PATH",
                   help="a task's data folder (official files or HF exports); repeat as TASK=PATH for several tasks")
    p.add_argument("--data-root", help="a folder holding one subfolder per task (SST-2, RTE, CB, BoolQ, ..., squad, "
                   "drop_dataset)")
    p.add_argument("--modes", default="ft,lora,prefix",
                   help="comma-separated: ft (full-parameter), lora, prefix (MeZO runs), zs, icl (eval baselines)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (data sampling and z); default 0")
    p.add_argument("--lr", help="comma-separated learning rates instead of the mode's grid")
    p.add_argument("--eps", help="zo.eps instead of the mode's")
    p.add_argument("--steps", type=int, default=STEPS, help=f"ZO steps per run (MeZO: {STEPS})")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY, help=f"dev evaluation interval (MeZO: {EVAL_EVERY})")
    p.add_argument("--batch-size", type=int, default=BATCH, help=f"global batch (MeZO: {BATCH})")
    p.add_argument("--demos", type=int, default=BASELINES["icl"], help="demonstrations of the icl mode (MeZO: 32)")
    p.add_argument("--model", help="model.path for every run (default: the config's, 'default')")
    p.add_argument("--out", default="runs/mezo", help="root of the run folders and the results table")
    p.add_argument("--launch", default=None, help="command that runs the package, e.g. 'deepspeed --num_gpus 8 "
                   "--module zo_deepspeed' (default: this python -m zo_deepspeed)")
    p.add_argument("--index", type=int, help="run only this run of the grid (see --list)")
    p.add_argument("--list", action="store_true", help="print the grid (index and run name) and exit")
    p.add_argument("--count", action="store_true", help="print the number of runs in the grid and exit")
    p.add_argument("--table", action="store_true", help="only rewrite OUT/results.csv and OUT/results.md")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="section.key=value for every run (after the recipe's: they win)")


def _run_process(cmd: list[str]) -> int:
    """Run ``cmd``; a SIGTERM to this process (SLURM's warning before the time limit) is passed on to it, and
    this process keeps waiting: the trainer checkpoints and exits 75, which the recipe returns."""
    proc = subprocess.Popen(cmd)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args) -> int:
    out = Path(args.out)
    if args.table:
        write_table(out)
        return 0
    runs = grid(args)
    if args.count:
        print(len(runs))
        return 0
    if args.list:
        for i, r in enumerate(runs):
            print(f"{i}\t{r.name}")
        return 0
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise ValueError(f"mezo: --index {args.index} is outside the grid's {len(runs)} runs (0..{len(runs) - 1})")
        runs = [runs[args.index]]
    launch = shlex.split(args.launch) if args.launch else [sys.executable, "-m", "zo_deepspeed"]
    failed = []
    for r in runs:
        d = out / r.name
        if (d / "summary.json").exists():
            print(f"[mezo] {r.name}: done, skipped", flush=True)
            continue
        cmd = r.command(out, args, launch)
        print("[mezo] " + r.name + ": " + shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        d.mkdir(parents=True, exist_ok=True)  # empty: a training run refuses a folder holding other files
        rc = _run_process(cmd)
        if rc == EXIT_PREEMPTED:
            print(f"[mezo] {r.name}: preempted (checkpoint written); run the same command again to resume", flush=True)
            return EXIT_PREEMPTED
        if rc != 0:
            print(f"[mezo] {r.name}: failed with exit status {rc}", file=sys.stderr, flush=True)
            failed.append(r.name)
            continue
        # the grid point's name for the table, once the run is done (written earlier, it would make the folder
        # one the trainer refuses: not empty and not a run directory)
        (d / "recipe.json").write_text(json.dumps({"task": r.task, "mode": r.mode, "lr": r.lr, "eps": r.eps,
                                                   "seed": r.seed, "name": r.name}))
    if not args.dry_run:
        write_table(out)
    if failed:
        print(f"[mezo] {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# -- the table -------------------------------------------------------------------------------------------
COLUMNS = ("task", "mode", "lr", "eps", "seed", "metric", "test", "test_final", "best_step", "best_dev_loss",
           "steps", "num_train", "num_dev", "num_test", "test_truncated", "test_answer_cut", "run")


def _row(d: Path) -> dict | None:
    try:
        s = json.loads((d / "summary.json").read_text())
        meta = json.loads((d / "recipe.json").read_text()) if (d / "recipe.json").exists() else {}
    except ValueError:
        return None
    trunc = (s.get("truncation") or {})
    trunc = trunc.get("test", trunc)  # train: per split; eval: the evaluated prompts
    row = {"task": s.get("task"), "mode": meta.get("mode") or s.get("adapter"), "seed": s.get("seed"),
           "metric": s.get("metric"), "run": d.name, "test_truncated": trunc.get("truncated"),
           "test_answer_cut": trunc.get("answer_cut")}
    if s.get("kind") == "eval":
        row.update(test=s.get("value"), num_test=s.get("n"))
        return row
    res, best = s.get("results", {}), s.get("best") or {}
    final = res.get("final", {}).get("value")
    row.update(lr=s.get("lr"), eps=s.get("eps"), test=res.get("best", res.get("final", {})).get("value"),
               test_final=final, best_step=best.get("step"), steps=s.get("steps"), num_train=s.get("num_train"),
               num_dev=s.get("num_dev"), num_test=s.get("num_test"),
               best_dev_loss=best.get("value") if best.get("key") == "dev/loss" else None)
    return row


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _cell(values: list[float], lr=None) -> str:
    vals = [100 * v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return ""
    text = f"{statistics.fmean(vals):.1f}"
    if len(vals) > 1:
        text += f" ± {statistics.stdev(vals):.1f}"
    text += f" ({len(vals)})"
    return text + (f" lr {lr:g}" if lr is not None else "")


def write_table(out: Path) -> tuple[Path, Path]:
    """OUT/results.csv and OUT/results.md from every finished run under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for d in sorted(p for p in out.iterdir() if (p / "summary.json").is_file()) if (r := _row(d))]
    csv_path, md_path = out / "results.csv", out / "results.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)]
    modes += sorted({r["mode"] for r in rows} - set(modes))
    lines = ["# MeZO protocol results", "",
             "Test metric x 100 (accuracy; F1 for SQuAD and DROP): mean ± standard deviation over seeds (number of "
             "seeds). Training modes: at the checkpoint of lowest dev loss, for the lr whose mean best dev loss is "
             "lowest (MeZO's grid). zs: zero-shot; icl: in-context demonstrations.", "",
             "| task | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for t in tasks:
        cells = []
        for m in modes:
            mine = [r for r in rows if r["task"] == t and r["mode"] == m]
            by_lr: dict = {}
            for r in mine:
                by_lr.setdefault(r.get("lr"), []).append(r)
            if not by_lr:
                cells.append("")
                continue
            def dev(rs):
                losses = [r["best_dev_loss"] for r in rs if r.get("best_dev_loss") is not None]
                return statistics.fmean(losses) if losses else math.inf
            lr = min(by_lr, key=lambda k: (dev(by_lr[k]), str(k)))
            cells.append(_cell([r["test"] for r in by_lr[lr]], lr if m in GRID else None))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path
