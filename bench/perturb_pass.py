"""ns/element of one perturbation pass over every parameter of a SmolLM2-135M-shaped Llama.

Variants, timed interleaved (order rotated every repeat), medians reported:

* fused compiled   zo_deepspeed.fused.apply(p.view(-1), 0, [Term(stream_key(seed, name), eps)])
                   per parameter: the project's pass (hash + Box-Muller + axpy in one
                   torch.compile'd loop), including its per-parameter Python overhead
* fused 2-term     the same with two streams (the first pass of a fuse_update step in
                   inplace mode: restore/update of z_{t-1} and +eps z_t in one pass)
* fused rademacher one term, dist='rademacher' (one hash lane, no log/cos)
* fused eager      compiled=False (the fallback: same ops on 64 Ki-element chunks); timed
                   over the parameters of layer 0 only (3.5 M elements) because it is
                   10-250x slower than the compiled pass here; reported per element
* MeZO reference   torch.manual_seed(s); per parameter
                   z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype);
                   p.data = p.data + scale*eps*z
* floor            p.data.add_(1e-3) per parameter (one read + one write: memory-bound floor)

fp32 and bf16 (the bf16 model is the fp32 one cast). Signs alternate between repeats so
the weights do not random-walk. The goal is reference/fused >= 2x.

This script raises torch._dynamo.config.recompile_limit to 64: fp32 x {1, 2 terms,
rademacher} + bf16 x the same is 12 graphs of one code object (two per combination: views
of 1-D and 2-D parameters), over dynamo's default 8, a hard error with fullgraph=True in
the initial library commit (the library raises the limit itself since 138b0c7). See
bench/README.md.

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/perturb_pass.py [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import itertools

import _common as C  # noqa: I001  (sets sys.path and the inductor env first)
import torch

from zo_deepspeed import fused
from zo_deepspeed.rng import stream_key

EPS = 1e-3


def variants(params: list[tuple[str, torch.Tensor]], subset: list[tuple[str, torch.Tensor]]):
    counter = itertools.count(1)
    sign = {"s": 1.0}

    def flip():
        sign["s"] = -sign["s"]
        return sign["s"]

    def fused_pass(compiled=True, nterms=1, dist="gaussian", over=params):
        def run():
            s = flip()
            seed = next(counter)
            for name, p in over:
                terms = [fused.Term(stream_key(seed + j, name), s * EPS) for j in range(nterms)]
                fused.apply(p.data.view(-1), 0, terms, distribution=dist, compiled=compiled)
        return run

    def mezo_ref():
        s = flip()
        torch.manual_seed(next(counter))
        for _, p in params:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + s * EPS * z

    def floor():
        s = flip()
        for _, p in params:
            p.data.add_(s * EPS)

    return {
        "fused compiled": fused_pass(True),
        "fused 2-term": fused_pass(True, nterms=2),
        "fused rademacher": fused_pass(True, dist="rademacher"),
        "fused eager": fused_pass(False, over=subset),
        "MeZO reference": mezo_ref,
        "floor add_": floor,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: 30, the real shape)")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    C.add_threads_arg(ap)
    args = ap.parse_args()
    suffix = C.apply_threads(args)

    torch._dynamo.config.recompile_limit = 64  # see the module docstring
    info = C.machine()
    print(info)
    base = C.build_model("smollm2-135m", torch.float32, layers=args.layers)
    results = {}
    numel = None
    for dtype in (torch.float32, torch.bfloat16):
        model = base if dtype == torch.float32 else base.to(torch.bfloat16)
        params = [(n, p) for n, p in model.named_parameters()]  # tied embedding counted once
        numel = sum(p.numel() for _, p in params)
        subset = [(n, p) for n, p in params if ".layers.0." in n]
        sub_numel = sum(p.numel() for _, p in subset)
        count = {k: numel for k in ("fused compiled", "fused 2-term", "fused rademacher", "MeZO reference",
                                    "floor add_")}
        count["fused eager"] = sub_numel
        print(f"\n{dtype}: {len(params)} parameters, {numel / 1e6:.1f} M elements "
              f"(eager subset: {len(subset)} parameters, {sub_numel / 1e6:.1f} M)")
        vs = variants(params, subset)
        # warm-up: compiles (one graph per dtype x term count x dist) and faults pages in
        for name, fn in vs.items():
            dt = C.timed(fn)
            print(f"  warm-up {name:17s} {dt:7.2f} s")
        cpu = {}
        times = C.interleaved(vs, args.repeats, cpu=cpu)
        for name, ts in times.items():
            ns = [t / count[name] * 1e9 for t in ts]  # wall ns per element
            cns = [t / count[name] * 1e9 for t in cpu[name]]  # CPU ns (all threads) per element
            results[(str(dtype).replace("torch.", ""), name)] = (ns, count[name], cns)
            print(f"  {name:17s} median {C.med(ns):7.2f} ns/el  ({C.spread(ns)})  cpu {C.med(cns):7.2f}", flush=True)
        del vs, params

    rows = []
    steps = []
    names = ("fused compiled", "fused 2-term", "fused rademacher", "fused eager", "MeZO reference", "floor add_")
    for dt in ("float32", "bfloat16"):
        wm = {n: C.med(results[(dt, n)][0]) for n in names}   # wall, median
        wl = {n: min(results[(dt, n)][0]) for n in names}     # wall, min
        cm = {n: C.med(results[(dt, n)][2]) for n in names}   # cpu, median
        for n in names:
            cnt = results[(dt, n)][1]
            rows.append([dt, n, f"{cnt / 1e6:.1f} M", wm[n], wl[n], max(results[(dt, n)][0]), cm[n],
                         wm["MeZO reference"] / wm[n], wl["MeZO reference"] / wl[n], cm["MeZO reference"] / cm[n],
                         wl[n] / wl["floor add_"]])
        ms = numel * 1e-6  # ns/el -> ms per whole-model pass
        for label, d in (("wall median", wm), ("wall min", wl), ("CPU median", cm)):
            fz, f2, ref = d["fused compiled"], d["fused 2-term"], d["MeZO reference"]
            steps.append([dt, label, 4 * ref * ms, (fz + f2) * ms, 3 * fz * ms, 4 * ref / (fz + f2),
                          4 * ref / (3 * fz)])
        print(f"{dt}: reference/fused = {wm['MeZO reference'] / wm['fused compiled']:.2f}x (wall medians), "
              f"{wl['MeZO reference'] / wl['fused compiled']:.2f}x (wall mins), "
              f"{cm['MeZO reference'] / cm['fused compiled']:.2f}x (CPU medians); goal >= 2x")

    t1 = C.table(["dtype", "pass", "timed over", "wall ns/el median", "wall ns/el min", "wall ns/el max",
                  "CPU ns/el median", "ref / this (wall median)", "ref / this (wall min)", "ref / this (CPU median)",
                  "this / floor (wall min)"], rows)
    t2 = C.table(["dtype", "statistic", "MeZO step: 4 ref passes (ms)", "ZO fuse_update=1: 1-term + 2-term (ms)",
                  "ZO fuse_update=0: 3 x 1-term (ms)", "speed-up fuse=1", "speed-up fuse=0"], steps)
    print("\n" + t1 + "\n\n" + t2)
    body = (f"SmolLM2-135M-shaped Llama, random init, {numel / 1e6:.1f} M elements (tied embedding once), "
            f"{args.repeats} interleaved repeats after one warm-up each; medians. "
            "`reference / this` > 1 means faster than the MeZO reference; goal for the fused compiled pass: >= 2x. "
            "CPU ns/el = process CPU time of all threads per element: with 2 threads it includes OpenMP "
            "spin-waiting while a thread is descheduled by other jobs; with --threads 1 there is none, and it is the "
            "statistic least affected by other jobs on this shared machine. "
            + C.quiet_note() + " The wall min is the least-disturbed wall-time estimate on this shared machine.\n\n"
            + t1 + "\n\nPer-step weight-edit cost of the whole model, derived from the per-pass statistics (MeZO: +eps, -2eps, +eps, update; "
            "ZO inplace: the update and restore of step t-1 ride in step t's first pass):\n\n" + t2 + "\n")
    if not args.no_write:
        C.write_section("perturb_pass" + suffix, "perturb_pass.py: one perturbation pass over all parameters"
                        + (f" ({args.threads} thread)" if args.threads else ""), body, info=info)


if __name__ == "__main__":
    main()
