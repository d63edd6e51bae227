"""Sparse-MeZO selection: per parameter, the entries of smallest magnitude.

The rule (deterministic, the same at every world size and layout): for a
parameter with n entries and keep fraction f, ``tau`` is the k-th smallest
``|theta|`` with ``k = ceil(f * n)``, computed once from the starting weights;
an entry is perturbed and updated while ``|theta| <= tau`` (ties at tau are all
in, so slightly more than k entries can be selected). The mask is evaluated on
the fly from the exact copy of theta inside each fused pass: nothing of
parameter size is stored.

``tau`` is found exactly without gathering anything: a bisection over the
bit patterns of float32 (for non-negative floats their order is the order of
the integers), 31 rounds, each counting local entries below the candidate and
summing the counts across ranks in one all-reduce for all parameters at once.
Counts are integers, so the result does not depend on how the entries are
split across ranks.
"""
from __future__ import annotations

import math
import struct
from typing import Callable, Sequence

import torch

__all__ = ["magnitude_thresholds"]

_INF_BITS = 0x7F800000


def _bits_to_float(b: int) -> float:
    return struct.unpack("<f", struct.pack("<i", b))[0]


def magnitude_thresholds(params: Sequence[tuple[str, int, Sequence[torch.Tensor]]], keep: float,
                         all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         chunk: int = 1 << 20) -> dict[str, float]:
    """``tau`` per parameter. ``params``: (key, full numel, this rank's disjoint 1-D slices of theta)
    in the same order on every rank (a rank without a slice passes an empty list); ``all_reduce``
    sums a float64 vector over ranks (None: this process holds every entry)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep fraction must be in (0, 1], got {keep}")
    k = torch.tensor([max(1, math.ceil(keep * n)) for _, n, _ in params], dtype=torch.float64)
    lo = torch.zeros(len(params), dtype=torch.int64)   # the answer's bit pattern lies in [lo, hi]
    hi = torch.full((len(params),), _INF_BITS, dtype=torch.int64)
    for _ in range(32):  # ceil(log2(0x7F800000)) = 31 rounds at most
        mid = (lo + hi) // 2
        counts = torch.zeros(len(params), dtype=torch.float64)
        for i, (_, _, slices) in enumerate(params):
            if lo[i] == hi[i]:
                continue
            m, c = int(mid[i]), 0
            for t in slices:
                # chunked: the temporaries stay a few MB whatever the parameter size
                for s in range(0, t.numel(), chunk):
                    c += int((t[s:s + chunk].float().abs().view(torch.int32) <= m).sum())
            counts[i] = c
        if all_reduce is not None:
            counts = all_reduce(counts)  # host sync point; integer-valued float64 sums are exact
        active, ok = lo < hi, counts >= k
        hi = torch.where(active & ok, mid, hi)
        lo = torch.where(active & ~ok, mid + 1, lo)
        if not bool((lo < hi).any()):  # lo/hi are equal on every rank: all ranks leave together
            break
    return {key: _bits_to_float(int(b)) for (key, _, _), b in zip(params, hi)}
