"""The long documented run: ZO fine-tuning of the default job next to a backprop reference.

Both arms use the default job's data (SmolLM2-135M-Instruct, Rotten Tomatoes: 1000 train,
200 dev, 500 test, seed 0), its batch of 16, its batch order (``trainer.batch_indices``: a pure
function of seed and step) and its objective (``choice``: cross-entropy of the gold verbalizer
among " negative"/" positive"); both are evaluated with the trainer's own scorer.

* ``zo``: the CLI itself, ``zo-deepspeed train`` with ``--steps``, ``--eval-every`` and any extra
  dotted overrides (``--set zo.lr=2e-5``); one fresh process. Its run directory holds
  metrics.jsonl, the trajectory and a checkpoint, so an interrupted arm continues with
  ``--resume``.
* ``backprop``: the same model in one plain process, torch AdamW (fp32), the same loss made
  differentiable (the scorer's single-token fast path with autograd on).
* ``report``: draws dev/test accuracy and training loss of both arms against steps into
  bench/plots/long_run.png and writes the ``long_run`` section of RESULTS.md.

Each arm writes bench/long_run/<arm>/metrics.jsonl (one JSON object per line, with wall time),
small enough to keep in the repository so the plot can be redrawn.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as C  # noqa: E402  (puts the repository root on sys.path)

OUT = C.BENCH / "long_run"
PLOT = C.BENCH / "plots" / "long_run.png"


def run_zo(args) -> None:
    out = OUT / args.name
    argv = ["train", f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
            f"train.save_every={args.save_every}", f"train.output_dir={out}", "train.export=false", *args.set]
    if args.resume:
        argv.append("--resume")
    cmd = [sys.executable, "-m", "zo_deepspeed", *argv]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    (out / "wall.json").write_text(json.dumps({"wall_s": time.time() - t0, "argv": argv, "rc": rc}))
    if rc:
        raise SystemExit(f"long_run: zo arm failed (exit {rc})")


def choice_loss(model, tokenizer, examples, max_length: int, token_ids):
    """Mean over examples of -log softmax_{candidates}(-NLL)[gold], with autograd (the trainer's
    ``choice`` objective on single-token verbalizers)."""
    import torch

    from zo_deepspeed.tasks import encode_prompts

    batch = encode_prompts(tokenizer, examples, max_length - 1, padding_side="left")
    pos = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                   logits_to_keep=1, use_cache=False).logits[:, -1].float()
    logp = torch.log_softmax(logits, -1)
    cand = torch.stack([logp[i, torch.tensor(ids)] for i, ids in enumerate(token_ids)])  # -NLL per candidate
    gold = torch.tensor([ex.label for ex in examples])
    return torch.nn.functional.cross_entropy(cand, gold)


def run_backprop(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from zo_deepspeed.build import load_tokenizer, resolve_model_path
    from zo_deepspeed.run_config import load_run_config, resolve_run_config
    from zo_deepspeed.tasks import build_splits, get_task, score_candidates, single_token_candidates
    from zo_deepspeed.trainer import batch_indices

    cfg = resolve_run_config(load_run_config(None, list(args.set)))  # the task's data.* defaults, as a run's
    task = get_task(cfg.data.task)
    splits = build_splits(task, cfg.data.data_dir, seed=cfg.zo.seed, num_train=cfg.data.num_train,
                          num_dev=cfg.data.num_dev, num_test=cfg.data.num_test)
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    out = OUT / args.name
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "metrics.jsonl").open("w")
    t0 = time.time()

    def emit(rec):
        log.write(json.dumps({**rec, "time": time.time()}) + "\n")
        log.flush()
        print(rec, flush=True)

    @torch.no_grad()
    def evaluate(split):
        model.eval()
        ex = splits[split]
        preds, _ = score_candidates(model, tok, ex, cfg.data.max_length, batch_size=cfg.train.eval_batch_size)
        model.train()
        return sum(int(p == e.label) for p, e in zip(preds, ex)) / len(ex)

    emit({"step": 0, "test/accuracy": evaluate("test")})
    model.train()
    n, b = len(splits["train"]), cfg.train.batch_size
    for step in range(args.steps):
        exs = [splits["train"][i] for i in batch_indices(cfg.zo.seed, step, n, b)]  # the ZO arm's batches
        loss = choice_loss(model, tok, exs, cfg.data.max_length, single_token_candidates(tok, exs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        emit({"step": step + 1, "loss": loss.item()})
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            emit({"step": step + 1, "dev/accuracy": evaluate("dev")})
    emit({"step": args.steps, "test/accuracy": evaluate("test")})
    (out / "wall.json").write_text(json.dumps({"wall_s": time.time() - t0, "lr": args.lr, "steps": args.steps,
                                               "overrides": list(args.set)}))


def load(name: str) -> dict:
    d = OUT / name
    recs = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    wall = json.loads((d / "wall.json").read_text()) if (d / "wall.json").exists() else {}
    test = [(r["step"], r["test/accuracy"]) for r in recs if "test/accuracy" in r]
    # an arm stopped by hand is finished with --resume train.steps=<its last checkpoint>: steps logged past
    # that checkpoint were discarded with it, and a resumed step is logged twice (keep the last)
    end = test[-1][0] if len(test) > 1 else float("inf")
    steps = list({r["step"]: r for r in recs if "loss" in r and r["step"] <= end}.values())
    steps.sort(key=lambda r: r["step"])
    return {"name": name, "recs": recs, "wall": wall,
            "loss": [(r["step"], r["loss"]) for r in steps],
            "dev": [(r["step"], r["dev/accuracy"]) for r in recs if "dev/accuracy" in r],
            "test": test,
            "s_per_step": statistics.median(b["time"] - a["time"] for a, b in zip(steps, steps[1:]))
            if len(steps) > 1 else None, "settings": _settings(d, wall)}


def _settings(d: Path, wall: dict) -> str:
    if "lr" in wall:  # the backprop arm
        return f"AdamW lr {wall['lr']}, fp32"
    cfg = json.loads((d / "config.json").read_text())
    zo, mode = cfg["zo"], cfg.get("adapter", {}).get("mode", "none")
    return f"ZO-SGD lr {zo['lr']:g}, eps {zo['eps']:g}, {'full' if mode == 'none' else mode}, {cfg['model']['dtype']}"


def smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [load(n) for n in args.arms]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, a in enumerate(arms):
        c = f"C{i}"  # one colour per arm: dev solid, test dashed
        if a["dev"]:
            ax1.plot(*zip(*a["dev"]), marker=".", color=c, label=f"{a['name']}: dev (200)")
        if a["test"]:
            ax1.plot(*zip(*a["test"]), marker="s", ls="--", color=c, label=f"{a['name']}: test (500)")
        if a["loss"]:
            s, l = zip(*a["loss"])
            ax2.plot(s, smooth(list(l), 50), color=c, label=f"{a['name']} (mean of 50 steps)")
    ax1.axhline(0.85, color="grey", lw=0.8, ls=":")
    ax1.set(xlabel="step (batch 16)", ylabel="accuracy", title="Rotten Tomatoes, SmolLM2-135M-Instruct")
    ax2.set(xlabel="step", ylabel="training loss (choice CE)", title="training loss")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    rows = []
    for a in arms:
        zs = a["test"][0][1] if a["test"] else None
        fin = a["test"][-1][1] if len(a["test"]) > 1 else None
        best_dev = max(a["dev"], key=lambda t: t[1]) if a["dev"] else None
        rows.append([a["name"], len(a["loss"]), f"{zs:.3f}" if zs is not None else "-",
                     f"{fin:.3f}" if fin is not None else "-",
                     f"{best_dev[1]:.3f} @ {best_dev[0]}" if best_dev else "-",
                     f"{a['s_per_step']:.2f}" if a["s_per_step"] else "-",
                     f"{(a['recs'][-1]['time'] - a['recs'][0]['time']) / 60:.0f}", a["settings"]])
    body = C.table(["arm", "steps", "test acc zero-shot", "test acc final", "best dev acc @ step", "s/step (median)",
                    "wall min", "settings"], rows)
    body += f"\n\n![long run]({os.path.relpath(PLOT, C.BENCH)})\n"
    if args.notes:
        body += "\n" + Path(args.notes).read_text()
    if not args.no_write:
        C.write_section("long_run", "long_run.py: ZO fine-tuning of the default job vs a backprop reference", body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("zo", "backprop"):
        p = sub.add_parser(name)
        p.add_argument("--name", default=name, help="arm name: bench/long_run/<name>/")
        p.add_argument("--steps", type=int, default=1000)
        p.add_argument("--eval-every", type=int, default=100, help="dev evaluation every K steps")
        p.add_argument("--set", nargs="*", default=[], help="dotted config overrides (zo.lr=2e-5 ...)")
        if name == "zo":
            p.add_argument("--save-every", type=int, default=100)
            p.add_argument("--resume", action="store_true")
        else:
            p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    p = sub.add_parser("report")
    p.add_argument("--arms", nargs="+", default=["zo", "backprop"])
    p.add_argument("--notes", help="markdown file appended to the section")
    p.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    {"zo": run_zo, "backprop": run_backprop, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
