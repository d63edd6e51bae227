"""ZO variants on the default task: accuracy after the same number of steps, time per step, peak memory.

Runs the CLI's default job (SmolLM2-135M-Instruct on Rotten Tomatoes, offline)
once per variant, each in a fresh process, with the same data, seed, batch and
number of steps; only the variant's own keys differ:

* full MeZO:    the default job (zo.lr 1e-5, eps 1e-3, every parameter)
* Sparse-MeZO:  zo.sparse_keep (default 0.2: the 20% smallest-|theta| entries of each
                parameter), zo.restore=master (the mask is read from the exact copy)
* LoRA:         adapter.mode=lora (MeZO's defaults for the mode: r 8, alpha 16 on
                q/v, lr 1e-4, eps 1e-2)
* prefix:       adapter.mode=prefix (5 tokens initialised from real activations,
                lr 1e-2, eps 1e-1)

Reported: zero-shot and final test accuracy (the trainer's own evaluation),
median seconds per training step (from metrics.jsonl timestamps), and the
process's peak RSS (ru_maxrss: model, data, evaluation and the steps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C  # noqa: E402  (puts the repository root on sys.path)

VARIANTS = {
    "full MeZO": [],
    "Sparse-MeZO": ["zo.sparse_keep={keep}", "zo.restore=master"],
    "LoRA": ["adapter.mode=lora"],
    "prefix": ["adapter.mode=prefix"],
}


def child(argv: list[str]) -> None:
    from zo_deepspeed.cli import main as cli_main

    rc = cli_main(argv)
    print(json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def run_variant(name: str, overrides: list[str], args, root: Path) -> dict:
    out = root / name.replace(" ", "_")
    argv = ["train", f"train.steps={args.steps}", f"data.num_test={args.num_test}", f"train.output_dir={out}",
            "train.export=false"] + [o.format(keep=args.keep) for o in overrides]
    print(f"== {name}: zo-deepspeed {' '.join(argv)}", flush=True)
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if p.returncode != 0:
        print(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(f"variants: {name} failed (exit {p.returncode})")
    rss = json.loads(p.stdout.strip().splitlines()[-1])["maxrss_kib"] * 1024
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    acc = [r for r in recs if any(k.startswith("test/") for k in r)]
    key = next(k for k in acc[-1] if k.startswith("test/"))
    steps = [r for r in recs if "loss" in r]
    dts = [b["time"] - a["time"] for a, b in zip(steps, steps[1:])]
    res = {"zero_shot": acc[0][key] if len(acc) > 1 else None, "final": acc[-1][key], "metric": key,
           "s_per_step": statistics.median(dts) if dts else None, "peak_rss": rss, "cmd": " ".join(argv)}
    print(f"   {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--num-test", type=int, default=500)
    ap.add_argument("--keep", type=float, default=0.2, help="Sparse-MeZO keep fraction")
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    info = C.machine()
    root = Path(tempfile.mkdtemp(prefix="zo_variants_"))
    res = {name: run_variant(name, VARIANTS[name], args, root) for name in args.only}
    shutil.rmtree(root, ignore_errors=True)
    rows = [[name, r["zero_shot"] if r["zero_shot"] is not None else "-", r["final"],
             f"{r['s_per_step']:.2f}" if r["s_per_step"] else "-", f"{r['peak_rss'] / 2**20:.0f}",
             f"`{' '.join(r['cmd'].split()[5:]) or '(defaults)'}`"] for name, r in res.items()]
    metric = next(iter(res.values()))["metric"]
    t = C.table(["variant", f"zero-shot {metric}", f"after {args.steps} steps", "s / step (median)",
                 "peak RSS MiB", "variant keys"], rows)
    print("\n" + t)
    body = (f"`zo-deepspeed train` (SmolLM2-135M-Instruct, Rotten Tomatoes, batch 16, seed 0) with "
            f"train.steps={args.steps}, data.num_test={args.num_test}, train.export=false, one fresh process per "
            "variant; only the variant keys differ. Time per step: median gap between consecutive step records of "
            "metrics.jsonl. Peak RSS: ru_maxrss of the whole run (model load and evaluations included).\n\n" + t + "\n")
    if not args.no_write:
        C.write_section("variants", "variants.py: full MeZO, Sparse-MeZO, LoRA and prefix on the default task",
                        body, info=info)


if __name__ == "__main__":
    main()
