"""Would pairing Box-Muller make the Gaussian z stream cheaper enough to change the stream? (measure, then decide)

The z stream (rng.py, version 1) makes one normal per element from two uniforms: two hash words, one
log, one sqrt and one cos per element. Box-Muller gives two normals per pair of uniforms (r cos t, r sin
t). The candidate version 2 pairs elements by global flat index inside aligned blocks of 2H (element
i pairs with i xor H; the first half takes r cos t, the second r sin t), so a slice still computes any
element from (seed, key, index) alone, and the aligned middle of a slice is two contiguous halves the
compiler vectorises: per element one hash word, half a log and sqrt, and one cos or sin.

Both as one fused pass ``x <- x + c z`` over the same float32 buffer in the library's chunks, compiled by
torch.compile, in one process, interleaved, best and median of ``--repeats``: version 1 through the
library's own ``fused.apply``, version 2 as the prototype below. Decision rule (the issue): adopt version 2 only if it
is >= 1.5x faster per pass.

    TORCHINDUCTOR_COMPILE_THREADS=1 python bench/box_muller.py [--threads 1] [--repeats 15]
"""
from __future__ import annotations

import argparse
import math

import _common as C  # noqa: I001  (puts the repository root on sys.path)
import torch

from zo_deepspeed import fused
from zo_deepspeed.rng import _word, stream_key

H = 512  # half block: element i pairs with i ^ H inside blocks of 2H


def v2_pass(x, p0, keys, c):
    """x [nb, 2, H] <- x + c z with z from the pairs p0 + [0, nb*H): first half r cos t, second r sin t."""
    nb = x.shape[0]
    p = (p0 + torch.arange(nb * H, dtype=torch.int64, device=x.device)).view(nb, H)
    u1 = (((_word(p, keys[0], keys[1]) >> 8) & 0xFFFFFF) + 1).to(torch.float32) * 2.0 ** -24
    u2 = ((_word(p, keys[2], keys[3]) >> 8) & 0xFFFFFF).to(torch.float32) * 2.0 ** -24
    r, t = torch.sqrt(-2.0 * torch.log(u1)), (2.0 * math.pi) * u2
    x[:, 0].copy_(x[:, 0] + c * (r * torch.cos(t)))
    x[:, 1].copy_(x[:, 1] + c * (r * torch.sin(t)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1 << 24, help="elements per pass (a multiple of 2H)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    C.add_threads_arg(ap)
    args = ap.parse_args()
    suffix = C.apply_threads(args)
    info = C.machine()
    x = torch.randn(args.n)
    key = stream_key(7, "model.layers.0.mlp.up_proj.weight")
    k, c = key.tensor(), torch.tensor(1e-3)
    v2 = torch.compile(v2_pass, dynamic=True, fullgraph=True)
    chunk = fused.default_chunk  # the library's chunk on the CPU: both passes walk the buffer the same way

    def v2_chunked():
        for s in range(0, args.n, chunk):
            v2(x[s:s + chunk].view(-1, 2, H), torch.tensor(s // 2, dtype=torch.int64), k, c)

    variants = {
        "v1: fused.apply, 1 term (the library)": lambda: fused.apply(x, 0, [fused.Term(key, 1e-3)], compiled=True),
        "v2 candidate: paired Box-Muller": v2_chunked,
    }
    for fn in variants.values():
        fn()
        fn()
    times = C.interleaved(variants, args.repeats)
    rows, best = [], {}
    for name, ts in times.items():
        best[name] = min(ts)
        rows.append([name, min(ts) / args.n * 1e9, C.med(ts) / args.n * 1e9, C.spread(ts)])
    v1, v2n = best[next(iter(best))], best[list(best)[1]]
    speedup = v1 / v2n
    verdict = (f"v2 is {speedup:.2f}x faster per pass (best of {args.repeats}): "
               + ("adopt (>= 1.5x)" if speedup >= 1.5 else "keep stream version 1 (< 1.5x: not worth a new stream "
                                                           "and the old logs' second code path)"))
    table = C.table(["pass", "ns / element (best)", "ns / element (median)", "min..max s"], rows)
    print("\n" + table + "\n\n" + verdict)
    body = (f"One pass x <- x + c z over {args.n / 2**20:.0f} Mi float32 elements, compiled, interleaved "
            f"({C.quiet_note()}).\n\n{table}\n\n**{verdict}**\n")
    if not args.no_write:
        C.write_section("box_muller" + suffix, "box_muller.py: paired Box-Muller (stream v2 candidate) vs stream v1",
                        body, info=info)


if __name__ == "__main__":
    main()
