"""The z streams: slice invariance, distribution, compiled == eager, bounded memory."""
import math
import subprocess
import sys

import pytest
import torch

from zo_deepspeed import rng
from zo_deepspeed.fused import Term, apply
from zo_deepspeed.rng import stream_key, variates, words


def _reference_word(i: int, k0: int, k1: int) -> int:
    """The spec in rng's docstring, written out in pure Python integers."""
    M = 0xFFFFFFFF

    def mix(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & M
        x ^= x >> 15
        x = (x * 0x735A2D97) & M
        return x ^ (x >> 15)

    return mix(mix((i & M) ^ k0) ^ ((i >> 32) ^ k1))


def test_words_match_the_written_spec():
    key = stream_key(42, "model.layers.0.mlp.up_proj.weight")
    idx = [0, 1, 2, 12345, 2**31 + 5, 2**32 + 7, 2**40 + 3]
    for lane in (0, 1, 2):
        k0, k1 = key.words[2 * lane], key.words[2 * lane + 1]
        for i in idx:
            assert int(words(key, i, 1, lane)[0]) == _reference_word(i, k0, k1)


def test_gaussian_from_words_matches_spec():
    key = stream_key(3, "w")
    w0, w1 = words(key, 100, 1000, 0).double(), words(key, 100, 1000, 1).double()
    u1 = (torch.floor(w0 / 256) + 1) * 2.0**-24
    u2 = torch.floor(w1 / 256) * 2.0**-24
    z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    assert torch.allclose(variates(key, 100, 1000).double(), z, atol=2e-6)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_any_split_concatenates_to_the_same_stream(dist):
    key = stream_key(7, "layer.weight")
    n = 10_007
    full = variates(key, 0, n, dist)
    g = torch.Generator().manual_seed(0)
    cuts = sorted(set(torch.randint(1, n, (9,), generator=g).tolist()))
    bounds = [0, *cuts, n]
    parts = [variates(key, s, e - s, dist) for s, e in zip(bounds[:-1], bounds[1:])]
    assert torch.equal(torch.cat(parts), full)
    # a slice deep inside, generated without what comes before it
    assert torch.equal(variates(key, 9000, 7, dist), full[9000:9007])


def test_gaussian_moments_and_normality():
    z = variates(stream_key(1, "p"), 0, 2_000_000).double()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z**3).mean().item()) < 0.01
    assert abs((z**4).mean().item() - 3) < 0.03
    # Kolmogorov-Smirnov distance to N(0,1) on a subsample
    s, _ = z[:200_000].sort()
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    emp = torch.arange(1, s.numel() + 1, dtype=torch.float64) / s.numel()
    assert (cdf - emp).abs().max().item() < 1.63 / math.sqrt(s.numel())  # 1% critical value


def test_streams_are_uncorrelated_across_neighbours_keys_and_seeds():
    n = 500_000
    a = variates(stream_key(1, "p"), 0, n).double()
    others = [variates(stream_key(1, "q"), 0, n), variates(stream_key(2, "p"), 0, n),
              variates(stream_key(1, "p"), 1, n)]  # neighbours: shifted by one
    for b in others:
        r = torch.corrcoef(torch.stack([a, b.double()]))[0, 1].item()
        assert abs(r) < 5 / math.sqrt(n)


def test_rademacher_is_plus_minus_one_balanced():
    z = variates(stream_key(9, "p"), 0, 1_000_000, "rademacher")
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(z.mean().item()) < 5e-3


def test_keys_depend_on_seed_and_name_only():
    assert stream_key(5, "a.b") == stream_key(5, "a.b")
    assert stream_key(5, "a.b") != stream_key(6, "a.b")
    assert stream_key(5, "a.b") != stream_key(5, "a.c")
    with pytest.raises(ValueError):
        stream_key(-1, "a")


def test_compiled_integer_stream_equals_eager():
    key = stream_key(11, "x")
    k = key.tensor()
    f = torch.compile(rng._word, dynamic=True, fullgraph=True)
    for start, n in ((0, 1000), (2**32 - 3, 777), (123_456_789, 4097)):
        idx = torch.arange(start, start + n, dtype=torch.int64)
        assert torch.equal(f(idx, k[0], k[1]), rng._word(idx, k[0], k[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_compiled_matches_eager_and_formula(dtype):
    key, key2 = stream_key(1, "w"), stream_key(2, "w")
    n = 70_001
    x0 = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
    want = (x0.float() * 0.99 + 0.5 * variates(key, 13, n) - 0.25 * variates(key2, 13, n)).to(dtype)
    outs = []
    for compiled in (True, False):
        x = x0.clone()
        apply(x, 13, [Term(key, 0.5), Term(key2, -0.25)], scale=0.99, compiled=compiled)
        outs.append(x)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    for x in outs:
        assert torch.allclose(x.float(), want.float(), rtol=tol, atol=1e-6)
    if dtype == torch.bfloat16:  # rounding boundaries may differ by one ulp in a handful of elements
        assert (outs[0] != outs[1]).float().mean() < 1e-3
    else:
        assert (outs[0] - outs[1]).abs().max() < 1e-6


def test_fused_pass_slices_are_bitwise_invariant():
    """Partition boundaries must not change a single bit (world-size invariance)."""
    key = stream_key(4, "w")
    n = 50_003
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(1))
    full = x0.clone()
    apply(full, 0, [Term(key, 1e-3)])
    parts = x0.clone()
    for s, e in ((0, 1), (1, 16_668), (16_668, 33_335), (33_335, n)):
        apply(parts[s:e], s, [Term(key, 1e-3)])
    assert torch.equal(full, parts)


_MEM_SCRIPT = r"""
import resource, sys, torch
from zo_deepspeed.fused import apply, Term
from zo_deepspeed.rng import stream_key
compiled = sys.argv[1] == "1"
terms = [Term(stream_key(0, "w"), 1.0), Term(stream_key(1, "w"), 1.0)]
x = torch.zeros(3 * 2**20 + 5, dtype=torch.float32)
apply(x, 0, terms, compiled=compiled)                                  # warm up: compile, allocator pools
x = torch.zeros(64 * 2**20, dtype=torch.float32)                       # 256 MiB parameter
x.add_(1.0)                                                            # touch every page
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
apply(x, 0, terms, compiled=compiled)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) / 1024)
"""


@pytest.mark.parametrize("compiled", ["0", "1"])
def test_fused_pass_extra_memory_is_bounded_by_a_chunk(compiled, tmp_path):
    # a fresh process, so ru_maxrss measures this pass alone; 256 MiB of
    # parameter must not cost anything like a parameter's worth of z (256 MiB)
    p = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, compiled], capture_output=True, text=True,
                       cwd=str(tmp_path), env={**__import__("os").environ,
                                               "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    assert p.returncode == 0, p.stderr[-3000:]
    extra_mib = float(p.stdout.strip().splitlines()[-1])
    assert extra_mib < 48, f"fused pass grew peak RSS by {extra_mib:.1f} MiB on a 256 MiB tensor"
