"""Fixed cost of one ``fused.apply`` call, and what it adds to a whole-model pass.

A pass calls ``fused.apply`` once per parameter piece (and once per 1 Mi-element
chunk inside it), so its cost is n_calls x fixed cost + elements x ns/element. On a
CPU the per-element term dominates; on an accelerator, where a 135 M-element pass
takes a fraction of a millisecond, the fixed term would be the whole pass. Measured
here on 512-element pieces (the kernel work is negligible), with the parts timed
separately:

* ``fused.apply`` end to end (stream_key + small tensors + compiled call);
* the compiled kernel called directly (dynamo guard evaluation + inductor wrapper);
* the ``torch._dynamo.config.patch(recompile_limit=64)`` context the library enters
  around every call (since 138b0c7), alone;
* ``stream_key`` (blake2b) alone; the 4 small ``torch.tensor`` calls per chunk alone.

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/call_overhead.py [--threads 1]
"""
from __future__ import annotations

import argparse

import _common as C  # noqa: I001
import torch

from zo_deepspeed import fused
from zo_deepspeed.rng import stream_key


def per_call_us(fn, n: int, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        C.wait_quiet()
        out.append(C.timed(lambda: [fn() for _ in range(n)]) / n * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pieces", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    C.add_threads_arg(ap)
    args = ap.parse_args()
    suffix = C.apply_threads(args)
    info = C.machine()
    print(info)
    xs = [torch.randn(512) for _ in range(args.pieces)]
    it = iter(range(10**9))

    def apply_all():
        s = next(it)
        for i, x in enumerate(xs):
            fused.apply(x, 0, [fused.Term(stream_key(s, f"p{i}"), 1e-3)])

    apply_all()
    wrapper = fused._compiled["inplace"]
    # since 138b0c7 the cached entry is a wrapper around the compiled function
    inner = wrapper.__closure__[0].cell_contents if getattr(wrapper, "__closure__", None) else wrapper
    x = xs[0]
    k = stream_key(1, "p0")
    keys, coefs = [k.tensor()], [torch.tensor(1e-3)]
    a, idx0 = torch.tensor(1.0), torch.tensor(0)
    rows = []
    res = {
        "fused.apply, end to end": [t / args.pieces for t in per_call_us(apply_all, 1, args.repeats)],
        "cached entry (what apply calls per chunk)": per_call_us(lambda: wrapper(x, idx0, a, keys, coefs, True),
                                                                 2000, args.repeats),
        "compiled kernel called directly": per_call_us(lambda: inner(x, idx0, a, keys, coefs, True), 2000,
                                                       args.repeats),
        "config.patch(recompile_limit=64) enter+exit": per_call_us(_patch_once, 20000, args.repeats),
        "stream_key (blake2b)": per_call_us(lambda: stream_key(12345, "model.layers.0.mlp.up_proj.weight"), 20000,
                                            args.repeats),
        "4 small torch.tensor() (key, coef, scale, idx0)": per_call_us(_four_tensors(k), 20000, args.repeats),
    }
    for name, us in res.items():
        rows.append([name, C.med(us), min(us)])
        print(f"  {name:48s} median {C.med(us):7.1f} us  min {min(us):7.1f}", flush=True)
    e2e = C.med(res["fused.apply, end to end"])
    # calls per pass for the two model shapes (one per piece, plus one per extra 1 Mi chunk)
    ncalls = {}
    for m in ("smollm2-135m", "opt-125m"):
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(C.model_config(m))
        ncalls[m] = sum(-(-p.numel() // fused.default_chunk) for _, p in model.named_parameters())
    t = C.table(["part", "us per call (median)", "us per call (min)"], rows)
    t2 = C.table(["model", "fused.apply calls per pass", "fixed cost per pass (ms, end-to-end median)"],
                 [[m, n, n * e2e / 1e3] for m, n in ncalls.items()])
    print("\n" + t + "\n\n" + t2)
    body = (f"{args.pieces} pieces of 512 float32 elements, one term; {args.repeats} repeats. " + C.quiet_note()
            + "\n\n" + t + "\n\n" + t2 + "\n")
    if not args.no_write:
        C.write_section("call_overhead" + suffix, "call_overhead.py: fixed cost per fused.apply call"
                        + (f" ({args.threads} thread)" if args.threads else ""), body, info=info)


def _patch_once():
    with torch._dynamo.config.patch(recompile_limit=64):
        pass


def _four_tensors(k):
    def run():
        k.tensor("cpu")
        torch.tensor(1e-3, dtype=torch.float32)
        torch.tensor(1.0, dtype=torch.float32)
        torch.tensor(5, dtype=torch.int64)
    return run


if __name__ == "__main__":
    main()
