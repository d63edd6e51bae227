"""Weight state of a ZO run as (theta, offset), and the one transition that edits it.

The visible weights (what a forward reads) are always ``x = theta + offset``,
where ``offset`` is the current perturbation, a short list of ``(seed, coef)``
streams (``+eps z``, ``-eps z`` or nothing). A step is a sequence of
transitions ``(update, new_offset)``: apply a pending update to theta, then
show ``theta + new_offset``. Each transition is one fused pass per piece, so

    MeZO:          +eps | -2eps | +eps (restore) | update      4 passes
    fuse_update=0: +eps | -eps  | update+restore               3 passes
    fuse_update=1: update(t-1)+restore+eps | -eps             2 passes

How theta is held depends on ``restore``:

* inplace: theta is not stored; ``x <- a*x - a*offset + update + new_offset``.
  Exact in exact arithmetic, drifts by rounding (badly in 16 bit).
* master: float32 copy of theta; ``x <- cast(theta + new_offset)``; restore
  is exact and the update accumulates in float32. The flip from ``+c z`` to
  ``-c z`` reflects x through theta (``x <- 2 theta - x``, no z evaluation), so
  both forwards of a perturbation see the same rounded displacement.
* backup: a copy of theta in the partition dtype; exact restore; the update
  is stochastically rounded (bf16) so small updates are not lost on average.
* none (``zo.perturb=forward``): the partition always holds theta (the
  forwards perturb what they read, :mod:`zo_deepspeed.perturb`); the only
  transition is the update, ``x <- a*x + update``, one pass per step,
  stochastically rounded in bf16 (seeded: deterministic, world-size invariant).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .fused import Term, apply, mirror
from .partitions import Partitions
from .rng import stream_key

__all__ = ["Update", "WeightState", "derive_seed", "resolve_restore"]

Stream = tuple[int, float]  # (seed, coefficient)


def derive_seed(run_seed: int, step: int, j: int) -> int:
    """Seed of perturbation j of step ``step``: 63 bits of blake2b("run/step/j")."""
    d = hashlib.blake2b(f"{run_seed}/{step}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") >> 1


@dataclass(frozen=True)
class Update:
    """theta <- (1 - decay) * theta + sum(coef * z_seed); decay applies to ndim >= 2 pieces only."""

    decay: float
    terms: tuple[Stream, ...]


def resolve_restore(restore: str, dtype: torch.dtype, perturb: str = "partition") -> str:
    """The restore mode for partitions of ``dtype`` under ``perturb`` (forward or partition)."""
    if restore == "auto":
        if perturb == "forward":
            # fp16 has no stochastic rounding here: small updates would be lost to round-to-nearest
            return "master" if dtype == torch.float16 else "none"
        return "inplace" if dtype == torch.float32 else "master"
    if restore in ("backup", "none") and dtype == torch.float16:
        raise ValueError(f"zo.restore={restore} rounds updates stochastically only for bf16/fp32 partitions; "
                         "use zo.restore=master with fp16")
    return restore


def _merge(terms: Sequence[Stream]) -> list[Stream]:
    out: dict[int, float] = {}
    for s, c in terms:
        out[s] = out.get(s, 0.0) + c
    return [(s, c) for s, c in out.items() if c != 0.0]


class WeightState:
    """theta + offset over the local pieces of one model."""

    def __init__(self, parts: Partitions, restore: str = "auto", distribution: str = "gaussian",
                 compiled: bool = True, base_device: str = "same", sparse_keep: float = 1.0,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, perturb: str = "partition"):
        """``sparse_keep`` < 1 (Sparse-MeZO): edits reach only the entries of smallest |theta|; the
        thresholds are computed here from the starting weights, summing counts over ranks with
        ``all_reduce`` (collective: every rank constructs its state at the same point)."""
        self.parts = parts
        dtype = parts.params[0][1].dtype
        self.restore = resolve_restore(restore, dtype, perturb)
        # elements of this rank's pieces written so far (instrumentation: a step's host work under offload)
        self.edited = 0
        self.distribution = distribution
        self.compiled = compiled
        self.base_device = base_device
        self.offset: list[Stream] = []
        self.bases: dict[tuple[str, str], torch.Tensor] = {}
        if self.restore in ("master", "backup"):
            with parts.editing() as it:
                for pc in it:
                    dev = pc.tensor.device if base_device == "same" else torch.device("cpu")
                    bdt = torch.float32 if self.restore == "master" else pc.tensor.dtype
                    self.bases[(pc.key, pc.slot)] = pc.tensor.detach().to(device=dev, dtype=bdt, copy=True)
        # Sparse-MeZO: per parameter key, edits reach only entries with |theta| <= threshold
        self.thresholds: dict[str, float] | None = None
        if sparse_keep < 1.0:
            if self.restore == "inplace":
                raise ValueError("zo.sparse_keep < 1 reads the mask from an exact theta: set zo.perturb=forward, or "
                                 "zo.restore=master (float32 copy) or zo.restore=backup (copy in the partition dtype)")
            from .sparse import magnitude_thresholds

            self.thresholds = magnitude_thresholds(self.primary_bases(), sparse_keep, all_reduce)

    def primary_bases(self) -> list[tuple[str, int, list[torch.Tensor]]]:
        """(key, numel, exact theta of this rank's own slices) for every trainable parameter, in the
        same order on every rank; hpZ secondary copies are left out (they duplicate primary slices)."""
        out: dict[str, tuple[str, int, list[torch.Tensor]]] = {}
        for name, p in self.parts.params:
            out[name] = (name, self.parts.full_shape(p).numel(), [])
        exact = self.bases.items()
        if self.restore == "none":  # the partition itself is theta
            if self.parts.nvme:
                raise ValueError("zo.sparse_keep < 1 with NVMe offload and zo.restore=none: the swapped-out "
                                 "partitions cannot be read for the thresholds; set zo.restore=master")
            with self.parts.editing() as it:
                exact = [((pc.key, pc.slot), pc.tensor) for pc in it]
        for (key, slot), b in exact:
            if slot in ("primary", "replica"):
                out[key][2].append(b.view(-1))
        return list(out.values())

    def base_bytes(self) -> int:
        """Extra memory this rank spends on master/backup copies."""
        return sum(b.numel() * b.element_size() for b in self.bases.values())

    def transition(self, update: Update | None, offset: Sequence[Stream]) -> None:
        """Apply ``update`` to theta, then make the visible weights theta + ``offset``."""
        offset = list(offset)
        if update is None and offset == self.offset:
            return
        if offset and self.restore == "none":
            raise ValueError("zo.restore=none: the partition is never perturbed (perturbations are read by the "
                             "forward); only updates may be applied")
        with self.parts.editing() as pieces:
            for pc in pieces:
                self._edit(pc, update, offset)
                self.edited += pc.tensor.numel()
        self.offset = offset

    def _edit(self, pc, update: Update | None, offset: list[Stream]) -> None:
        decay = update.decay if (update is not None and pc.ndim >= 2) else 0.0
        a = 1.0 - decay
        upd = list(update.terms) if update is not None else []
        keys = lambda streams: [Term(stream_key(s, pc.key), c) for s, c in streams]  # noqa: E731
        tau = None if self.thresholds is None else self.thresholds[pc.key]
        sr = None
        if self.restore in ("backup", "none") and upd:
            # noise for rounding keyed by the first update seed: deterministic,
            # world-size invariant, different every step
            sr = stream_key(upd[0][0], pc.key)
        if self.restore == "inplace":
            terms = _merge([(s, -a * c) for s, c in self.offset] + upd + offset)
            apply(pc.tensor, pc.start, keys(terms), scale=a, distribution=self.distribution,
                  compiled=self.compiled)
            return
        if self.restore == "none":  # x is theta: the mask is read from it, before the update
            apply(pc.tensor, pc.start, keys(upd), scale=a, stochastic_round=sr, mask_below=tau,
                  distribution=self.distribution, compiled=self.compiled)
            return
        base = self.bases[(pc.key, pc.slot)]
        # theta + d -> theta - d (the second forward of a perturbation): x was written from the exact theta,
        # so it is reflected through it, with no z evaluation; both forwards see the same rounded d
        flip = update is None and len(offset) == 1 and self.offset == [(offset[0][0], -offset[0][1])]
        if base.device == pc.tensor.device:
            if flip:
                mirror(pc.tensor, base, compiled=self.compiled)
                return
            apply(pc.tensor, pc.start, keys(offset), scale=a, base=base, base_terms=keys(upd),
                  stochastic_round=sr, mask_below=tau, distribution=self.distribution, compiled=self.compiled)
            return
        # base in host memory, partition on the accelerator: stream it through
        # in bounded chunks (this is the 4 B/param-in-CPU-RAM trade-off).
        step = 1 << 22
        n = pc.tensor.numel()
        for s in range(0, n, step):
            e = min(n, s + step)
            b = base[s:e].to(pc.tensor.device)
            if flip:
                mirror(pc.tensor[s:e], b, compiled=self.compiled)
                continue
            apply(pc.tensor[s:e], pc.start + s, keys(offset), scale=a, base=b, base_terms=keys(upd),
                  stochastic_round=sr, mask_below=tau, distribution=self.distribution, compiled=self.compiled)
            if upd or a != 1.0:
                base[s:e].copy_(b)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The scalar state (JSON-able): the visible offset and the Sparse-MeZO thresholds."""
        return {"offset": [list(t) for t in self.offset], "thresholds": self.thresholds}

    def load_state_dict(self, sd: dict) -> None:
        """Take up ``sd``; the tensors must already show that offset (see :meth:`load_local_tensors`)."""
        self.offset = [(int(s), float(c)) for s, c in sd["offset"]]
        self.thresholds = None if sd["thresholds"] is None else {k: float(v) for k, v in sd["thresholds"].items()}

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """Host copies of this rank's pieces (``slot|key``) and master/backup copies (``base:slot|key``)."""
        out = {}
        with self.parts.editing() as pieces:
            for pc in pieces:
                out[f"{pc.slot}|{pc.key}"] = pc.tensor.detach().cpu().clone()
        for (key, slot), b in self.bases.items():
            out[f"base:{slot}|{key}"] = b.detach().cpu().clone()
        return out

    def load_local_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write tensors saved by :meth:`local_tensors` at the same world size and layout back in place."""
        with self.parts.editing() as pieces:
            for pc in pieces:
                pc.tensor.copy_(tensors[f"{pc.slot}|{pc.key}"])
        for (key, slot), b in self.bases.items():
            b.copy_(tensors[f"base:{slot}|{key}"])
