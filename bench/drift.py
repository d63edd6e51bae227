"""Drift and lost updates of each restore mode with bf16 weights.

Part 1 (lr = 0): N ZO steps (fuse_update=True, eps 1e-3, gaussian) then ``flush()``;
with lr = 0 the weights should come back exactly to the start. Reported against the
start: max |diff|, RMS diff, fraction of elements changed, for bf16 restore=inplace,
master, backup, and fp32 inplace; plus each mode's extra memory
(``engine.state.base_bytes()`` per parameter element).

Part 2 (small lr > 0): N steps then ``flush()``; the intended total update of every
element, sum_t -lr*g_t*z_t (from the run's own seeds and g), is accumulated in float32
with the fused kernel and compared with the realized change of the weights:

* retained = <realized, intended> / <intended, intended>: the fraction of the update
  that reached the weights on average (1: all of it; 0: all rounded away);
* rel. error = ||realized - intended|| / ||intended|| (rounding noise and drift);
* never moved = fraction of elements whose stored value is exactly the start value
  (every one of their N updates rounded away);
* per-step lost (backup/master only): fraction of elements whose stored base value
  did not change in a step's update, averaged over steps (fuse_update=False here so the
  update lands in the base at the end of each step).

Model: SmolLM2-135M shape (random init, std 0.02; norms 1.0), a tiny batch (1 x 16
tokens: with lr = 0 the forwards do not affect the weights, and the passes over the
134.5 M elements dominate). Raises torch._dynamo.config.recompile_limit (see
bench/README.md: fp32 and bf16 kernels in one process exceed dynamo's default 8, which
was a hard error before the library raised the limit itself in 138b0c7).

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/drift.py [--steps 20] [--lr-steps 10] [--lr 1e-6]
"""
from __future__ import annotations

import argparse
import gc

import _common as C  # noqa: I001
import torch

import zo_deepspeed as zd
from zo_deepspeed import fused
from zo_deepspeed.rng import stream_key

EPS = 1e-3


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load(model, snap) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(snap[n])


@torch.no_grad()
def compare(model, start) -> dict:
    mx, ss, changed, n = 0.0, 0.0, 0, 0
    for name, p in model.named_parameters():
        d = p.float() - start[name].float()
        mx = max(mx, float(d.abs().max()))
        ss += float(d.double().pow(2).sum())
        changed += int((p != start[name]).sum())
        n += p.numel()
    return {"max": mx, "rms": (ss / n) ** 0.5, "changed": changed / n, "n": n}


def part1(models: dict, starts: dict, batch: dict, steps: int) -> list[list]:
    rows = []
    for dt, restore in (("bfloat16", "inplace"), ("bfloat16", "master"), ("bfloat16", "backup"),
                        ("float32", "inplace")):
        model = models[dt]
        load(model, starts[dt])
        eng = zd.initialize(model, None, zd.ZOConfig(lr=0.0, eps=EPS, restore=restore))
        t = C.timed(lambda: [eng.step(batch) for _ in range(steps)] and eng.flush())
        r = compare(model, starts[dt])
        extra = eng.state.base_bytes() / r["n"]
        print(f"  lr=0 {dt:8s} {restore:7s} max {r['max']:.3g} rms {r['rms']:.3g} changed {r['changed']:.4f} "
              f"extra {extra:.0f} B/param ({t:.0f} s)", flush=True)
        rows.append([dt, restore, steps, r["max"], r["rms"], r["changed"], extra])
        del eng
        gc.collect()
    return rows


def part2(model, start, batch: dict, steps: int, lr: float) -> list[list]:
    rows = []
    params = list(model.named_parameters())
    for restore in ("inplace", "backup", "master"):
        load(model, start)
        fuse = restore == "inplace"  # base modes: update at the end of each step, to count per-step losses
        eng = zd.initialize(model, None, zd.ZOConfig(lr=lr, eps=EPS, restore=restore, fuse_update=fuse))
        lost = []
        res = []
        for _ in range(steps):
            before = {k: b.clone() for k, b in eng.state.bases.items()} if eng.state.bases else None
            res.append(eng.step(batch))
            if before is not None:
                unchanged = sum(int((eng.state.bases[k] == before[k]).sum()) for k in before)
                lost.append(unchanged / sum(b.numel() for b in before.values()))
            del before
        eng.flush()
        # intended update, accumulated in float32 with the same streams
        num = den = err = 0.0
        never = n = 0
        mnum = mden = merr = 0.0
        for name, p in params:
            u = torch.zeros(p.numel(), dtype=torch.float32)
            for r in res:
                if not r.skipped:
                    fused.apply(u, 0, [fused.Term(stream_key(r.seeds[0], name), -lr * r.g[0])])
            real = (p.detach().float() - start[name].float()).view(-1)
            num += float((real.double() * u.double()).sum())
            den += float(u.double().pow(2).sum())
            err += float((real - u).double().pow(2).sum())
            never += int((p.detach() == start[name]).sum())
            n += p.numel()
            if restore == "master":
                base = eng.state.bases[(name, "replica")]
                mreal = base - start[name].float().view(-1)
                mnum += float((mreal.double() * u.double()).sum())
                merr += float((mreal - u).double().pow(2).sum())
        gs = [abs(r.g[0]) for r in res]
        row = [restore, steps, lr, C.med(gs), (den / n) ** 0.5, num / den, (err / den) ** 0.5, never / n,
               (sum(lost) / len(lost)) if lost else "-"]
        rows.append(row)
        print(f"  lr={lr} bf16 {restore:7s} |g| median {C.med(gs):.3g} intended rms {(den / n) ** 0.5:.3g} "
              f"retained {num / den:.3f} rel.err {(err / den) ** 0.5:.3f} never moved {never / n:.4f} "
              f"per-step lost {row[-1]}", flush=True)
        if restore == "master":
            rows.append(["master (fp32 copy)", steps, lr, C.med(gs), (den / n) ** 0.5, mnum / den,
                         (merr / den) ** 0.5, "-", "-"])
        del eng, res
        gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="steps of the lr=0 drift runs")
    ap.add_argument("--lr-steps", type=int, default=10, help="steps of the lr>0 runs")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default 30)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64  # see bench/README.md
    info = C.machine()
    print(info)
    m32 = C.build_model("smollm2-135m", torch.float32, layers=args.layers)
    start32 = snapshot(m32)
    m16 = C.build_model("smollm2-135m", torch.float32, layers=args.layers).to(torch.bfloat16)
    start16 = {k: v.to(torch.bfloat16) for k, v in start32.items()}
    models, starts = {"float32": m32, "bfloat16": m16}, {"float32": start32, "bfloat16": start16}
    batch = C.make_batch(m16.config.vocab_size, 1, 16)
    numel = sum(p.numel() for p in m16.parameters())
    print(f"{numel / 1e6:.1f} M elements")

    rows1 = part1(models, starts, batch, args.steps)
    del m32, start32
    gc.collect()
    rows2 = part2(m16, start16, batch, args.lr_steps, args.lr)

    t1 = C.table(["dtype", "restore", "steps", "max abs diff", "RMS diff", "fraction changed",
                  "extra bytes/param"], rows1)
    t2 = C.table(["bf16 restore", "steps", "lr", "median abs g", "intended RMS update", "retained",
                  "rel. error", "never moved", "per-step lost (base)"], rows2)
    print("\n" + t1 + "\n\n" + t2)
    body = (f"SmolLM2-135M shape, {numel / 1e6:.1f} M elements, random init (weights ~N(0, 0.02), norm weights "
            f"1.0), eps {EPS}, gaussian z, batch 1 x 16 random tokens.\n\n"
            f"lr = 0, {args.steps} steps (fuse_update=True) then flush(), compared with the start "
            "(exact restore would give 0):\n\n" + t1 + "\n\n"
            f"lr = {args.lr}, {args.lr_steps} steps then flush() (inplace: fuse_update=True; backup/master: "
            "fuse_update=False so each step's update lands in the base by the end of the step). `retained` = "
            "<realized, intended>/|intended|^2, `rel. error` = |realized - intended|/|intended|, `never moved` = "
            "fraction of bf16 weights still bit-equal to the start, `per-step lost` = fraction of base elements "
            "an update left unchanged, mean over steps:\n\n" + t2 + "\n")
    if not args.no_write:
        C.write_section("drift", "drift.py: bf16 restore modes, drift at lr = 0 and lost updates", body, info=info)


if __name__ == "__main__":
    main()
