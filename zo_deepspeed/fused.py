"""Fused in-place passes over one flat tensor: ``x <- a*x + sum_t c_t * z_t``.

Every weight edit of the trainer (perturb, flip, restore, update, and the
deferred update folded into the next perturbation) is one call of
:func:`apply` per local piece: one read and one write of the piece, z
regenerated on the fly from its counter-based stream, never stored.

Two implementations of the same arithmetic:

* compiled (``torch.compile``; C++/OpenMP on CPU, Triton on GPU): hash,
  Box-Muller and the axpy fuse into one loop, so z never exists in memory;
* eager: the same ops on ``chunk``-sized slices, for platforms without a
  compiler and as the reference.

Either way extra memory is bounded by one chunk (a few MB), never by the size
of a parameter. Arithmetic is float32 whatever the storage dtype.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch

from .rng import StreamKey, _sr_bits, _variates

__all__ = ["Term", "apply", "perturbed_rows", "mirror", "default_chunk"]

# Compiled, on CPU: 1 Mi elements, large enough that the per-call Python
# overhead (~20-50 us) is noise next to the ~3 ms of work. On an accelerator a
# 1 Mi-element pass takes microseconds, so the launch overhead would dominate:
# there the compiled kernel (which keeps z in registers, no temporaries) gets
# 64 Mi elements per call. Eager: 64 Ki, so its temporaries (about a dozen
# chunk-sized float32/int64 tensors) stay a few MB.
default_chunk = 1 << 20
accelerator_chunk = 1 << 26
_EAGER_CHUNK = 1 << 16


@dataclass(frozen=True)
class Term:
    """``coef * z`` where z is the stream of ``key``."""

    key: StreamKey
    coef: float


def _combine(v, idx, keys, coefs, gaussian):
    for k, c in zip(keys, coefs):
        v = v + c * _variates(idx, k, gaussian)
    return v




def _round_bf16_stochastic(v, idx, srkey):
    # bf16 is the top half of float32: adding uniform noise to the low 16 bits
    # and truncating rounds up with probability equal to the dropped fraction.
    bits = v.view(torch.int32).to(torch.int64)
    bits = (bits + _sr_bits(idx, srkey)) & ~0xFFFF
    # back to int32 two's complement before re-viewing as float32
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits.view(torch.float32)


def _add_terms(v, b, idx, keys, coefs, gaussian, tau):
    """v + sum(c z); with ``tau`` (Sparse-MeZO) the sum reaches only entries whose exact theta ``b``
    has |b| <= tau. Dense keeps the plain left-to-right order (bitwise what it always was)."""
    if tau is None:
        return _combine(v, idx, keys, coefs, gaussian)
    dz = _combine(torch.zeros_like(v), idx, keys, coefs, gaussian)
    return v + torch.where(b.abs() <= tau, dz, torch.zeros_like(dz))


def _kernel_inplace(x, idx0, a, keys, coefs, srkey, gaussian: bool, tau=None):
    idx = idx0 + torch.arange(x.shape[0], dtype=torch.int64, device=x.device)
    v = x.to(torch.float32)
    v = _add_terms(v * a, v, idx, keys, coefs, gaussian, tau)
    if srkey is not None:
        v = _round_bf16_stochastic(v, idx, srkey)
    x.copy_(v)


def _kernel_rows(out, base, idx, keys, coefs, gaussian: bool, tau=None):
    """out <- base + sum(c z) at the arbitrary global indices ``idx`` (rows of an embedding)."""
    b = base.to(torch.float32)
    out.copy_(_add_terms(b, b, idx, keys, coefs, gaussian, tau))


def _kernel_mirror(x, base):
    """x <- 2*base - x: the reflection of theta + d through theta (exactly theta - d when representable)."""
    b = base.to(torch.float32)
    x.copy_(2.0 * b - x.to(torch.float32))


def _kernel_base(x, base, idx0, a, ukeys, ucoefs, pkeys, pcoefs, srkey, gaussian: bool, update: bool, tau=None):
    idx = idx0 + torch.arange(x.shape[0], dtype=torch.int64, device=x.device)
    b = base.to(torch.float32)
    if update:
        b = _add_terms(b * a, b, idx, ukeys, ucoefs, gaussian, tau)
        if srkey is not None:
            b = _round_bf16_stochastic(b, idx, srkey)
        base.copy_(b)
        b = base.to(torch.float32)
    x.copy_(_add_terms(b, b, idx, pkeys, pcoefs, gaussian, tau))


_compiled: dict[str, object] = {}


def _get(name: str, fn, compiled: bool):
    if not compiled:
        return fn
    if name not in _compiled:
        # dynamic=True: one graph for every chunk length and offset instead of
        # a recompile per distinct piece size.
        cfn = torch.compile(fn, dynamic=True, fullgraph=True)

        def run(*args):
            # Each (number of terms, dtype, mode) combination is its own graph
            # of the same code object; a long run with q > 1, flushes and
            # evaluations legitimately needs more than dynamo's default 8.
            with torch._dynamo.config.patch(recompile_limit=64):
                return cfn(*args)

        _compiled[name] = run
    return _compiled[name]


def compile_enabled() -> bool:
    """Default for ``compiled``: on unless ZO_DEEPSPEED_COMPILE=0."""
    return os.environ.get("ZO_DEEPSPEED_COMPILE", "1") != "0"


def apply(
    x: torch.Tensor,
    start: int,
    terms: Sequence[Term] = (),
    *,
    scale: float = 1.0,
    base: torch.Tensor | None = None,
    base_terms: Sequence[Term] = (),
    stochastic_round: StreamKey | None = None,
    mask_below: float | None = None,
    distribution: str = "gaussian",
    compiled: bool | None = None,
    chunk: int | None = None,
) -> None:
    """One fused pass over the 1-D tensor ``x`` holding global elements [start, start+len(x)).

    Without ``base``: ``x <- scale*x + sum(terms)``, stochastically rounded when ``stochastic_round``
    is given and x is bf16; ``mask_below`` then reads the mask from x itself, before the edit, so x
    must hold theta exactly (a partition that is never perturbed: zo.perturb=forward).

    With ``base`` (a float32 master or a 16-bit backup of the same elements):
    if ``base_terms`` or ``scale != 1``: ``base <- scale*base + sum(base_terms)``
    (stochastically rounded when ``stochastic_round`` is given and base is
    bf16); then ``x <- base + sum(terms)`` in x's dtype. ``x`` is only ever
    written from ``base``, so restoring it is exact.

    ``mask_below`` (Sparse-MeZO): the terms reach only the entries whose exact
    value in ``base`` has ``|base| <= mask_below`` (evaluated before the update
    for ``base_terms``, after it for ``terms``).
    """
    if x.dim() != 1:
        raise ValueError("fused.apply expects a 1-D view")
    n = x.shape[0]
    if n == 0:
        return
    if base is not None and base.shape != x.shape:
        raise ValueError(f"base shape {tuple(base.shape)} != piece shape {tuple(x.shape)}")
    if compiled is None:
        compiled = compile_enabled()
    gaussian = distribution == "gaussian"
    dev = x.device
    keys = [t.key.tensor(dev) for t in terms]
    coefs = [torch.tensor(float(t.coef), dtype=torch.float32, device=dev) for t in terms]
    a = torch.tensor(float(scale), dtype=torch.float32, device=dev)
    step = chunk or (_EAGER_CHUNK if not compiled else default_chunk if dev.type == "cpu" else accelerator_chunk)
    tau = None if mask_below is None else torch.tensor(float(mask_below), dtype=torch.float32, device=dev)
    if base is None:
        if scale == 1.0 and not terms:
            return
        srkey = stochastic_round.tensor(dev) if stochastic_round is not None and x.dtype == torch.bfloat16 else None
        fn = _get("inplace", _kernel_inplace, compiled)
        for s in range(0, n, step):
            e = min(n, s + step)
            idx0 = torch.tensor(start + s, dtype=torch.int64, device=dev)
            fn(x[s:e], idx0, a, keys, coefs, srkey, gaussian, tau)
        return
    update = bool(base_terms) or scale != 1.0
    ukeys = [t.key.tensor(dev) for t in base_terms]
    ucoefs = [torch.tensor(float(t.coef), dtype=torch.float32, device=dev) for t in base_terms]
    srkey = None
    if update and stochastic_round is not None and base.dtype == torch.bfloat16:
        srkey = stochastic_round.tensor(dev)
    fn = _get("base", _kernel_base, compiled)
    for s in range(0, n, step):
        e = min(n, s + step)
        idx0 = torch.tensor(start + s, dtype=torch.int64, device=dev)
        fn(x[s:e], base[s:e], idx0, a, ukeys, ucoefs, keys, coefs, srkey, gaussian, update, tau)


def perturbed_rows(base: torch.Tensor, idx: torch.Tensor, terms: Sequence[Term], *, mask_below: float | None = None,
                   distribution: str = "gaussian", compiled: bool | None = None) -> torch.Tensor:
    """``base + sum(terms)`` at the global flat indices ``idx`` (1-D int64, same length as the 1-D
    ``base`` holding theta at those indices), in base's dtype: the same arithmetic, element for element,
    as :func:`apply` with ``base``. For the rows an embedding lookup reads."""
    if compiled is None:
        compiled = compile_enabled()
    dev = base.device
    keys = [t.key.tensor(dev) for t in terms]
    coefs = [torch.tensor(float(t.coef), dtype=torch.float32, device=dev) for t in terms]
    tau = None if mask_below is None else torch.tensor(float(mask_below), dtype=torch.float32, device=dev)
    out = torch.empty_like(base)
    if out.numel():
        _get("rows", _kernel_rows, compiled)(out, base, idx, keys, coefs, distribution == "gaussian", tau)
    return out


def mirror(x: torch.Tensor, base: torch.Tensor, *, compiled: bool | None = None) -> None:
    """``x <- 2*base - x`` over two 1-D tensors of one shape: turns ``theta + d`` into ``theta - d``
    without evaluating z again (exact where ``theta - d`` is representable; otherwise one rounding)."""
    if compiled is None:
        compiled = compile_enabled()
    n = x.shape[0]
    step = _EAGER_CHUNK if not compiled else default_chunk if x.device.type == "cpu" else accelerator_chunk
    fn = _get("mirror", _kernel_mirror, compiled)
    for s in range(0, n, step):
        fn(x[s:s + step], base[s:s + step])
