"""Peak memory of a ZO training step vs inference on the same model and batch.

Every workload runs in its own fresh subprocess (so peaks do not mix) that:

1. imports torch/transformers/zo_deepspeed, builds the model (directly in its dtype)
   and the batch; records RSS ("after build") and ru_maxrss;
2. runs the workload once as warm-up (the ZO step twice: the first step compiles the
   fused kernel in-process, the second is the steady state with a pending update);
   records ru_maxrss: the **raw peak** (whole life of the process, build and compile
   included);
3. resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``), runs the
   workload twice more and records ru_maxrss again: the **steady peak**;
   **steady delta** = steady peak - RSS after build (what the workload adds to the
   resident model).

Workloads: ``infer logits`` (``model(input_ids, attention_mask)`` under no_grad),
``infer loss`` (``causal_lm_loss`` under no_grad: the forward a ZO step runs twice),
``zo step`` (``engine.step(batch)``, config None, fuse_update=True, zo.perturb=partition), ``zo step read``
(zo.perturb=forward: one forward over the batch stacked twice, no restore copy) next to ``infer loss 2B``
(the same loss on the doubled batch: the forward that step runs), and for reference
``backprop+AdamW`` (forward, backward, ``AdamW.step``, ``zero_grad(set_to_none=True)``).
Rows marked ``*`` use ``chunked_lm_loss`` below, a proposed replacement for the
library's ``causal_lm_loss`` (same sum and count; checked) that does not copy the
logits and bounds the float32 log-softmax to 256 positions at a time.
All in eval mode (no dropout masks). fp32 (restore auto = inplace), and bf16 with each
restore mode. The parent process stays small (it does not import torch until the
children are done), because a child's ru_maxrss can inherit its parent's peak through
vfork+exec.

Goal: ZO step <= 1.05 x inference.

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/memory.py [--model opt-125m] [--batch 8 --seq 128]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import _common as C  # noqa: I001  (no torch import at module level)

MiB = 2**20


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def chunked_lm_loss(forward, batch: dict, rows: int = 256):
    """Proposed replacement for zo_deepspeed.engine.causal_lm_loss (same per-token losses, same sum and count).

    Shifts the labels instead of slicing the logits, so no (B, T-1, V) copy is made by
    the reshape of a non-contiguous slice, and computes the float32 log-softmax
    ``rows`` positions at a time instead of for the whole batch at once.
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}
    logits = forward(**inputs).logits
    target = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    flat = logits.reshape(-1, logits.shape[-1])  # a view: HF logits are contiguous
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for s in range(0, flat.shape[0], rows):
        t = target[s:s + rows]
        loss = F.cross_entropy(flat[s:s + rows].float(), t, ignore_index=-100, reduction="none")
        total += loss[t != -100].double().sum()
    return total, (target != -100).sum().double()


def child(spec: dict) -> dict:
    import gc

    import torch

    import zo_deepspeed as zd
    from zo_deepspeed.engine import causal_lm_loss

    dtype = getattr(torch, spec["dtype"])
    model = C.build_model(spec["model"], dtype)
    batch = C.make_batch(C.model_config(spec["model"]).vocab_size, spec["batch"], spec["seq"])
    gc.collect()
    out = {"rss_build": _status("VmRSS"), "maxrss_build": maxrss(),
           "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    w = spec["workload"]
    loss_fn = causal_lm_loss
    if w.endswith("*"):  # the same workload with the proposed loss function
        loss_fn, w = chunked_lm_loss, w[:-1].rstrip()
    if w == "infer logits":
        @torch.no_grad()
        def run():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        warm = 1
    elif w in ("infer loss", "infer loss 2B"):
        if w == "infer loss 2B":  # the stacked forward a perturb-on-read step runs (K = 2 copies of the batch)
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}

        @torch.no_grad()
        def run():
            loss_fn(model, batch)
        warm = 1
    elif w == "zo step":
        eng = zd.initialize(model, None, zd.ZOConfig(lr=1e-6, restore=spec["restore"], fuse_update=True,
                                                     perturb=spec.get("perturb", "partition")), loss_fn=loss_fn)
        out["base_bytes"] = eng.state.base_bytes()
        out["restore"] = eng.state.restore
        out["perturb"] = eng.perturb
        out["largest_param_bytes"] = max(p.numel() * p.element_size() for p in model.parameters())

        def run():
            eng.step(batch)
        warm = 2
    elif w == "backprop+AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def run():
            s, c = causal_lm_loss(model, batch)
            (s / c).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        warm = 1
    else:
        raise ValueError(w)
    for _ in range(warm):
        run()
    gc.collect()
    out["maxrss_raw"] = maxrss()
    out["hwm_raw"] = _status("VmHWM")
    out["reset"] = reset_peak()
    out["hwm_after_reset"] = _status("VmHWM")
    out["rss_before"] = _status("VmRSS")
    for _ in range(2):
        run()
    out["maxrss_steady"] = maxrss()
    out["hwm_steady"] = _status("VmHWM")
    if loss_fn is chunked_lm_loss and w == "infer loss":  # after the measurement: check it is the same loss
        with torch.no_grad():
            a, b = causal_lm_loss(model, batch), chunked_lm_loss(model, batch)
        out["same_loss"] = bool(torch.equal(a[1], b[1]) and abs(float(a[0] - b[0])) <= 1e-9 * abs(float(a[0])))
    out["maxrss_raw"] = max(out["maxrss_raw"], out["maxrss_steady"])
    return out


def run_child(spec: dict, mmap_threshold: int | None = None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if mmap_threshold:
        # glibc: serve every allocation >= this from its own mmap, returned to the OS on free, so RSS
        # follows live memory instead of what the heap keeps cached (fixed threshold, no dynamic growth)
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-125m", choices=C.MODELS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false")
    ap.add_argument("--mmap-threshold", type=int, default=None,
                    help="set MALLOC_MMAP_THRESHOLD_ in the children (e.g. 1048576): peaks then track live memory "
                         "rather than the glibc heap's caching; results go to section memory-mmap<N>")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return

    load0 = "%.1f %.1f %.1f" % os.getloadavg()
    common = {"model": args.model, "batch": args.batch, "seq": args.seq}
    # (dtype, workload, restore); "zo step" rows are partition mode, "zo step read" rows zo.perturb=forward
    plan = [("float32", "infer logits", None), ("float32", "infer loss", None), ("float32", "zo step", "auto"),
            ("float32", "infer loss 2B", None), ("float32", "zo step read", "none"),
            ("float32", "backprop+AdamW", None), ("float32", "infer loss *", None), ("float32", "zo step *", "auto")]
    if args.bf16:
        plan += [("bfloat16", "infer loss", None), ("bfloat16", "zo step", "inplace"),
                 ("bfloat16", "zo step", "backup"), ("bfloat16", "zo step", "master"),
                 ("bfloat16", "infer loss 2B", None), ("bfloat16", "zo step read", "none"),
                 ("bfloat16", "infer loss *", None), ("bfloat16", "zo step *", "inplace")]
    res = {}
    for dt, w, restore in plan:
        spec = dict(common, dtype=dt, workload=w.replace(" read", ""), restore=restore,
                    perturb="forward" if w.endswith(" read") else "partition")
        r = run_child(spec, args.mmap_threshold)
        res[(dt, w, restore)] = r
        print(f"{dt:9s} {w:15s} {restore or '':8s} build {r['rss_build'] / MiB:7.0f} MiB  raw peak "
              f"{r['maxrss_raw'] / MiB:7.0f}  steady peak {r['maxrss_steady'] / MiB:7.0f} "
              f"(VmHWM {r['hwm_steady'] / MiB:.0f}, reset ok: {r['reset']}, after reset "
              f"{r['hwm_after_reset'] / MiB:.0f})", flush=True)

    info = C.machine()  # imports torch: only now, after the children
    info["load"] = load0
    rows = []
    for dt in ("float32", "bfloat16"):
        ref = res.get((dt, "infer loss", None))
        if ref is None:
            continue
        ref_raw, ref_delta = ref["maxrss_raw"], ref["maxrss_steady"] - ref["rss_build"]
        ref_steady = ref["maxrss_steady"]
        for (d, w, restore), r in res.items():
            if d != dt:
                continue
            delta = r["maxrss_steady"] - r["rss_build"]
            name = w + (f" (perturb={r['perturb']}, restore={r.get('restore', restore)})" if w.startswith("zo step")
                        else "")
            if "same_loss" in r:
                name += f" (same sum/count as causal_lm_loss: {r['same_loss']})"
            goal = ""
            if w == "zo step *":
                ref_p = res[(dt, "infer loss *", None)]["maxrss_steady"]
                q = r["maxrss_steady"] / ref_p
                goal = f"vs infer loss *: {q:.3f}, " + ("met" if q <= 1.05 else f"missed by {q - 1.05:.2f}")
            elif w == "zo step":
                q = r["maxrss_steady"] / ref_steady
                goal = "met" if q <= 1.05 else f"missed by {q - 1.05:.2f}"
            elif w == "zo step read":
                # its forward is one of 2B rows: compared with that forward, plus the one read copy it holds
                ref2 = res[(dt, "infer loss 2B", None)]["maxrss_steady"]
                lim = 1.05 + r["largest_param_bytes"] / ref2
                q = r["maxrss_steady"] / ref2
                goal = (f"vs infer loss 2B: {q:.3f} (goal <= 1.05 + largest parameter = {lim:.3f}): "
                        + ("met" if q <= lim else f"missed by {q - lim:.2f}"))
            rows.append([dt, name, r["param_bytes"] / MiB, r["rss_build"] / MiB, r["rss_before"] / MiB,
                         r["maxrss_raw"] / MiB,
                         r["maxrss_steady"] / MiB, delta / MiB, r.get("base_bytes", 0) / MiB,
                         r["maxrss_raw"] / ref_raw, r["maxrss_steady"] / ref_steady,
                         delta / ref_delta if ref_delta > 0 else float("nan"), goal])
    t = C.table(["dtype", "workload", "params MiB", "RSS after build MiB", "RSS after warm-up MiB",
                 "raw peak MiB (ru_maxrss)",
                 "steady peak MiB", "steady delta MiB", "master/backup MiB", "raw / infer loss",
                 "steady / infer loss", "delta / infer-loss delta", "goal (steady <= 1.05)"], rows)
    print("\n" + t)
    resets = all(r["reset"] and r["hwm_after_reset"] < r["hwm_raw"] for r in res.values())
    body = (f"{args.model}-shaped model, random init, batch {args.batch} x seq {args.seq}, one fresh process per "
            "row. Raw peak: ru_maxrss over the whole process (build, first call and, for ZO, the in-process "
            "kernel compile included). Steady peak: ru_maxrss over two more calls after resetting the peak mark "
            f"(clear_refs 5; reset effective in every child: {resets}). Steady delta = steady peak - RSS after "
            "build. Ratios are against `infer loss` (forward + loss under no_grad, the forward a ZO step runs) "
            "of the same dtype; `zo step read` (zo.perturb=forward) also against `infer loss 2B`, the forward of the "
            "stacked batch it runs. Goal: ZO step <= 1.05 x inference (read mode: plus its one read copy, the "
            "largest parameter). Rows marked * use the proposed `chunked_lm_loss` "
            "of bench/memory.py instead of the library's `causal_lm_loss` (passed to initialize as loss_fn).\n\n"
            + t + "\n")
    if args.mmap_threshold:
        body = (f"Children run with MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}: every allocation of that size or "
                "more is its own mmap, unmapped on free, so the peaks follow live memory, not the heap's cache. "
                + body)
    if not args.no_write:
        suffix = f"-mmap{args.mmap_threshold}" if args.mmap_threshold else ""
        C.write_section("memory" + suffix, "memory.py: peak memory, ZO step vs inference"
                        + (f" (MALLOC_MMAP_THRESHOLD_={args.mmap_threshold})" if suffix else ""), body, info=info)


if __name__ == "__main__":
    main()
