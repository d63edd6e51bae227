"""Counter-based perturbation streams: z as a pure function of (seed, key, index).

Why not ``torch.manual_seed`` + ``torch.normal``: under ZeRO-3 a rank owns an
arbitrary flat slice of each parameter, so z for an element must not depend on
which rank generates it, in which order, or on which device. A counter-based
hash gives exactly that, lets any slice ``[start, start+n)`` be generated
without generating what comes before it, and never touches the global RNG.

Stream specification (version 1; enough to re-implement it elsewhere)
--------------------------------------------------------------------
* ``M = 2**32 - 1``. ``mix32(x)`` is the 32-bit finaliser found by Chris
  Wellons' hash-prospector (the one splitmix32 uses), on a 32-bit word::

      x ^= x >> 16; x = (x * 0x21F0AAAD) & M
      x ^= x >> 15; x = (x * 0x735A2D97) & M
      x ^= x >> 15

  Both multipliers are below 2**31, so every product of a 32-bit word fits
  in a signed 64-bit integer: no overflow in any implementation.

* Lane keys. ``d = blake2b(f"{seed}/{key}".encode(), digest_size=24)`` where
  ``seed`` is a non-negative integer written in decimal and ``key`` the
  parameter's name (``model.layers.0.mlp.up_proj.weight``). The digest is read
  as six little-endian uint32 words ``k[0..5]``. Lane ``l`` (0: first uniform,
  1: second uniform, 2: stochastic-rounding noise) uses ``(k[2l], k[2l+1])``.
* Word of lane ``l`` at flat index ``i`` (``0 <= i < 2**63``)::

      word_l(i) = mix32(mix32((i & M) ^ k[2l]) ^ ((i >> 32) ^ k[2l+1]))

* Gaussian (default): ``u1 = ((word_0 >> 8) + 1) * 2**-24`` in (0, 1],
  ``u2 = (word_1 >> 8) * 2**-24`` in [0, 1), ``z = sqrt(-2 ln u1) * cos(2 pi u2)``
  in float32 (Box-Muller, one variate per element so that elements stay
  independent of their neighbours' positions).
* Rademacher: ``z = 1 - 2 * (word_0 >> 31)``.
* Stochastic-rounding noise (bf16 backup mode): ``word_2 & 0xFFFF``.

The integer words are exact everywhere (eager, compiled CPU, Triton); the
float transform can differ in the last ulp between implementations of
``log``/``cos``, which is why tests compare the integer stream bit for bit and
the variates to float32 rounding.

Implementation note: the words are computed in int32 (two's complement of the
uint32 word), where multiplication wraps modulo 2**32 and ``>>`` is made
logical by masking. That is the spec's arithmetic exactly, at twice the SIMD
width of int64 lanes (and a 32-bit multiply is native everywhere, GPUs
included): on this project's CPU the hash costs half what an int64 form did.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .typed import choices

__all__ = ["StreamKey", "stream_key", "words", "variates", "Distribution", "DISTRIBUTIONS", "STREAM_VERSION"]

# Written into every trajectory log: replaying a log needs the stream that produced it.
STREAM_VERSION = "zo_deepspeed.z/1"

Distribution = Literal["gaussian", "rademacher"]  # zo.distribution
DISTRIBUTIONS = choices(Distribution)
_M = 0xFFFFFFFF
_C1 = 0x21F0AAAD
_C2 = 0x735A2D97


@dataclass(frozen=True)
class StreamKey:
    """The six 32-bit lane words of one (seed, parameter key) stream."""

    words: tuple[int, int, int, int, int, int]

    def tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The lane words as int32 (words >= 2**31 wrap to negative: same bits)."""
        return torch.tensor([w - (1 << 32) if w >= (1 << 31) else w for w in self.words],
                            dtype=torch.int32, device=device)


def stream_key(seed: int, key: str) -> StreamKey:
    if seed < 0:
        raise ValueError(f"stream seed must be non-negative, got {seed}")
    d = hashlib.blake2b(f"{seed}/{key}".encode(), digest_size=24).digest()
    return StreamKey(tuple(int.from_bytes(d[4 * j: 4 * j + 4], "little") for j in range(6)))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # x is int32 holding a uint32 word: * wraps modulo 2**32 (what the spec
    # means), and arithmetic >> is turned into the spec's logical shift by
    # masking off the copied sign bits.
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2
    return x ^ ((x >> 15) & 0x1FFFF)


def _word(idx: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """int32 word (uint32 bits) of one lane at the non-negative int64 indices ``idx``."""
    lo = idx.to(torch.int32)  # keeps the low 32 bits (two's complement wrap)
    hi = (idx >> 32).to(torch.int32)
    return _mix32(_mix32(lo ^ k0) ^ (hi ^ k1))


_TWO_POW_M24 = 2.0 ** -24
_TWO_PI = 2.0 * math.pi


def _variates(idx: torch.Tensor, keys: torch.Tensor, gaussian: bool) -> torch.Tensor:
    """float32 z at int64 indices ``idx`` for the lane words ``keys`` (int32 [6]).

    Written with plain tensor ops so the same body runs eagerly and under
    ``torch.compile`` (where it fuses into the caller's pointwise kernel).
    """
    w0 = _word(idx, keys[0], keys[1])
    if not gaussian:
        return 1.0 - 2.0 * ((w0 >> 31) & 1).to(torch.float32)
    w1 = _word(idx, keys[2], keys[3])
    u1 = (((w0 >> 8) & 0xFFFFFF) + 1).to(torch.float32) * _TWO_POW_M24
    u2 = ((w1 >> 8) & 0xFFFFFF).to(torch.float32) * _TWO_POW_M24
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)


def _sr_bits(idx: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return _word(idx, keys[4], keys[5]) & 0xFFFF  # non-negative int32


def words(key: StreamKey, start: int, n: int, lane: int = 0, device="cpu") -> torch.Tensor:
    """The raw uint32 words (as int64 in [0, 2**32)) of one lane for indices [start, start+n)."""
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    k = key.tensor(device)
    return _word(idx, k[2 * lane], k[2 * lane + 1]).to(torch.int64) & _M


def variates(key: StreamKey, start: int, n: int, distribution: str = "gaussian", device="cpu") -> torch.Tensor:
    """z[start:start+n] as float32 (eager; allocates n floats: for tests and references)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; use one of {DISTRIBUTIONS}")
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    return _variates(idx, key.tensor(device), distribution == "gaussian")
