"""Scale on this box: the largest OPT shape one ZO step runs on in 24 GB, next to backprop + AdamW.

Each attempt is a fresh process whose private memory is capped with
RLIMIT_DATA (``--cap-gib``, default 21 GiB: the machine's 24 GB less what the
OS and a shell need), so running out of memory is a clean MemoryError in that
process instead of the kernel's OOM killer choosing a victim. Random weights
(the step's cost does not depend on their values), batch 1 x ``--seq`` tokens.

* ZO: ``zo_deepspeed.initialize`` with ZeRO-3 + ``offload_param: cpu`` and bf16
  at world size 1 (one gloo rank), restore=inplace (a master copy would add
  4 B/param), the model built under ``HfDeepSpeedConfig`` so it is partitioned
  as it is created; one full step (two forwards, the weight passes, the update)
  must complete.
* Backprop: the same shape in bf16 as a plain module, ``torch.optim.AdamW``
  (states in the parameters' dtype: the lightest AdamW there is, 8 B/param with
  the gradients), one forward + backward + optimizer step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _common as C  # noqa: E402  (puts the repository root on sys.path)

# OPT family shapes (public architecture numbers): hidden, layers, heads, ffn
SHAPES = {"opt-350m": (1024, 24, 16, 4096), "opt-1.3b": (2048, 24, 32, 8192), "opt-2.7b": (2560, 32, 32, 10240),
          "opt-6.7b": (4096, 32, 32, 16384), "opt-13b": (5120, 40, 40, 20480)}


def opt_config(name: str):
    from transformers import OPTConfig

    h, n, a, f = SHAPES[name]
    proj = 512 if name == "opt-350m" else h
    return OPTConfig(vocab_size=50272, hidden_size=h, num_hidden_layers=n, num_attention_heads=a, ffn_dim=f,
                     max_position_embeddings=2048, word_embed_proj_dim=proj, do_layer_norm_before=name != "opt-350m")


def child(spec: dict) -> dict:
    cap = int(spec["cap_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    import torch

    torch.set_num_threads(2)
    cfg = opt_config(spec["model"])
    batch = C.make_batch(cfg.vocab_size, 1, spec["seq"])
    t0 = time.time()
    out = {}
    if spec["method"] == "zo":
        import zo_deepspeed as zd
        from transformers import AutoModelForCausalLM

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(spec["port"]))
        ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False}}}
        eng = zd.initialize(lambda: AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16), ds,
                            zd.ZOConfig(lr=1e-7, eps=1e-3, restore="inplace"))
        out["params"] = sum(eng.parts.full_shape(p).numel() for _, p in eng.parts.params)
        out["build_s"] = time.time() - t0
        t1 = time.time()
        r = eng.step(batch)
        eng.flush()
        out["step_s"] = time.time() - t1
        out["loss"] = r.loss
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        out["params"] = sum(p.numel() for p in model.parameters())
        out["build_s"] = time.time() - t0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        t1 = time.time()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        out["step_s"] = time.time() - t1
        out["loss"] = float(loss)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return out


def attempt(model: str, method: str, args) -> dict:
    spec = {"model": model, "method": method, "seq": args.seq, "cap_gib": args.cap_gib, "port": C.free_port()}
    t = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=args.timeout)
    rec = {"model": model, "method": method, "wall_s": time.time() - t, "ok": p.returncode == 0}
    if p.returncode == 0:
        rec.update(json.loads(p.stdout.strip().splitlines()[-1]))
    else:
        tail = (p.stderr or p.stdout).strip().splitlines()
        err = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "?")
        rec["error"] = err[-160:]
    print(rec, flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zo-models", nargs="+", default=["opt-2.7b", "opt-6.7b"], choices=list(SHAPES))
    ap.add_argument("--bp-models", nargs="+", default=["opt-350m", "opt-1.3b", "opt-2.7b"], choices=list(SHAPES))
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--cap-gib", type=float, default=21.0)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    info = C.machine()
    recs = [attempt(m, "zo", args) for m in args.zo_models] + [attempt(m, "backprop", args) for m in args.bp_models]
    rows = [[r["model"], "ZO step (ZeRO-3 + offload_param cpu, bf16, inplace)" if r["method"] == "zo"
             else "backprop + AdamW (bf16 params and states)", f"{r['params'] / 1e9:.2f} B" if r.get("params") else "-",
             "completed" if r["ok"] else f"failed: {r.get('error', '')}", f"{r['peak_rss_gib']:.1f}" if r["ok"] else "-",
             f"{r['build_s']:.0f}" if r["ok"] else "-", f"{r['step_s']:.0f}" if r["ok"] else "-"] for r in recs]
    t = C.table(["shape", "method", "params", "outcome", "peak RSS GiB", "build s", "one step s"], rows)
    print("\n" + t)
    best = {m: max((r for r in recs if r["method"] == m and r["ok"]), key=lambda r: r["params"], default=None)
            for m in ("zo", "backprop")}
    summary = ", ".join(f"{m}: {b['model'] if b else 'none'}" for m, b in best.items())
    body = (f"Random weights, batch 1 x {args.seq} tokens, one fresh process per row with its private memory capped at "
            f"{args.cap_gib:g} GiB (RLIMIT_DATA), 2 threads. Largest that completed one step: {summary}.\n\n" + t + "\n")
    if not args.no_write:
        C.write_section("scale_box", "scale_box.py: largest model one step runs on in this 24 GB machine", body,
                        info=info)


if __name__ == "__main__":
    main()
