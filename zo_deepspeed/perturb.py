"""Perturb on read (``zo.perturb=forward``): K perturbed models evaluated in one forward, the partition
never perturbed.

A step's K blocks (two-sided SPSA: K = 2, ``+eps z`` and ``-eps z`` of one seed; q perturbations:
K = 2q) run as one forward over K copies of the batch stacked along the batch dimension. Every module
that owns trainable parameters gets a forward wrapper (the instance's ``forward`` attribute: DeepSpeed's
pre/post-forward hooks still fire once per call, and its prefetch trace sees the same module order).
Inside its call, after DeepSpeed has gathered the module's parameters into ``p.data`` and before it
releases them, the wrapper computes each block's rows with ``p.data`` pointing at
``theta + c_k z_k``, a temporary made from the gathered copy on the device that runs the forward (z
generated from the parameter's stream at its global flat indices, :mod:`zo_deepspeed.fused`), and puts
the gathered tensor back before returning. Extra memory: the perturbed copy of one module's parameters
for one block at a time. An embedding lookup reads only the rows of the batch's tokens, so only those
rows are perturbed (a tied output head still reads every row).

The weights a block sees are exactly ``fused.apply(..., base=theta)``'s, the same arithmetic as the
partition mode's exact restore (``zo.restore=master``): the two modes agree element for element where
the z stream is evaluated the same way.

Loss functions are unchanged: ``loss_fn(forward, batch)`` is called once per block with a forward that
runs the stacked forward on block 0's first call and hands each block its own rows of every output
(:class:`_BlockForward`), so any objective that calls ``forward`` deterministically works.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .fused import Term, apply, mirror, perturbed_rows
from .rng import stream_key

__all__ = ["Block", "ReadPerturbation"]

Stream = tuple[int, float]


@dataclass(frozen=True)
class Block:
    """One perturbed model of a K-block forward: weights ``theta + sum(c * z_seed)``."""

    terms: tuple[Stream, ...]


def _rows(args, kwargs) -> int:
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    raise ValueError("zo.perturb=forward: a module that owns trainable parameters was called without a tensor "
                     "input; set zo.perturb=partition for this model")


def _slice(v, n: int, lo: int, hi: int):
    """Rows [lo, hi) of every tensor whose first dimension is the stacked batch ``n``."""
    if torch.is_tensor(v):
        return v[lo:hi] if v.dim() > 0 and v.shape[0] == n else v
    if isinstance(v, (tuple, list)):
        return type(v)(_slice(x, n, lo, hi) for x in v)
    return v


def _cat(outs: list):
    o = outs[0]
    if torch.is_tensor(o):
        return torch.cat(outs, 0)
    if isinstance(o, (tuple, list)):
        return type(o)(_cat([x[i] for x in outs]) for i in range(len(o)))
    if o is None:
        return None
    raise TypeError(f"zo.perturb=forward: cannot stack a module output of type {type(o).__name__}; "
                    "set zo.perturb=partition for this model")


def _block_of(out, k: int, K: int, n: int):
    if torch.is_tensor(out):
        if out.dim() == 0 or out.shape[0] != n:
            return out
        b = n // K
        return out[k * b:(k + 1) * b]
    if isinstance(out, dict):  # HF ModelOutput is an OrderedDict of its set fields
        fields = {key: _block_of(v, k, K, n) for key, v in out.items()}
        try:
            return type(out)(**fields)
        except TypeError:
            return dict(fields)
    if isinstance(out, (tuple, list)):
        return type(out)(_block_of(x, k, K, n) for x in out)
    return out  # caches and other objects: shared, not split (a scoring loss reads the logits)


def _stack(v, K: int):
    if torch.is_tensor(v) and v.dim() > 0:
        return torch.cat([v] * K, 0)
    return v


class _BlockForward:
    """The forward the loss function sees, one pass per block over the same calls: block 0's calls run
    the stacked forward (inputs repeated K times along the batch); every call's output is split into
    the K blocks' rows and handed to the later passes in call order."""

    def __init__(self, forward: Callable, read: "ReadPerturbation", blocks: Sequence[Block]):
        self.forward, self.read, self.blocks = forward, read, list(blocks)
        self.outputs: list[list] = []
        self.block = 0
        self.call = 0

    def start(self, k: int) -> None:
        self.block, self.call = k, 0

    def __call__(self, *args, **kwargs):
        K = len(self.blocks)
        if self.block == 0:
            n = _rows(args, kwargs) * K
            with self.read.reading(self.blocks):
                out = self.forward(*(_stack(a, K) for a in args), **{k: _stack(v, K) for k, v in kwargs.items()})
            self.outputs.append([_block_of(out, k, K, n) for k in range(K)])
        if self.call >= len(self.outputs):
            raise RuntimeError("zo.perturb=forward: the loss function called forward more often for a later block "
                               "than for the first; it must make the same calls for every block")
        out = self.outputs[self.call][self.block]
        self.outputs[self.call][self.block] = None  # each block's rows are read once
        self.call += 1
        return out


class ReadPerturbation:
    """Forward wrappers on the modules that own the trainable parameters ``params`` (name, parameter)."""

    def __init__(self, module: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]],
                 distribution: str = "gaussian", compiled: bool = True, thresholds: dict[str, float] | None = None):
        self.distribution, self.compiled, self.thresholds = distribution, compiled, thresholds
        self._blocks: list[Block] | None = None
        self._buffers: dict = {}
        # the stream key of a parameter is its (first) name: a tied weight read by two modules gets the same z
        key_of = {id(p): name for name, p in params}
        self.modules: list[str] = []
        for mname, m in module.named_modules():
            own = [(key_of[id(p)], p) for p in m.parameters(recurse=False) if id(p) in key_of]
            if not own:
                continue
            nested = [f"{mname}.{c}" for c, child in m.named_children()
                      if any(id(p) in key_of for p in child.parameters())]
            if nested:
                raise ValueError(f"zo.perturb=forward: module {mname or type(m).__name__} owns trainable parameters "
                                 f"and has children that do too ({nested[0]}); its forward cannot be split into "
                                 "blocks; set zo.perturb=partition for this model")
            m.forward = self._wrap(m, m.forward, own)
            self.modules.append(mname)

    @contextlib.contextmanager
    def reading(self, blocks: Sequence[Block]):
        """While active, every wrapped module evaluates ``len(blocks)`` row blocks of its input, block k
        with its parameters at ``theta + blocks[k]``."""
        self._blocks = list(blocks)
        try:
            yield
        finally:
            self._blocks = None

    @torch.no_grad()
    def losses(self, loss_fn: Callable, forward: Callable, micro_batches: Sequence[dict],
               blocks: Sequence[Block]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block, the (sum, count) of ``loss_fn`` over the micro-batches: one stacked forward per
        micro-batch call. Returns (sums of shape [K], the count of block 0)."""
        sums = torch.zeros(len(blocks), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for mb in micro_batches:
            fwd = _BlockForward(forward, self, blocks)
            for k in range(len(blocks)):
                fwd.start(k)
                s, c = loss_fn(fwd, mb)
                sums[k] += s.detach().double().cpu()
                if k == 0:
                    count += torch.as_tensor(c).double().cpu()
        return sums, count

    # -- the wrapper --------------------------------------------------------------------------
    def _scratch(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A flat buffer of ``numel`` elements of ``like``'s dtype and device, reused by every module call:
        the one parameter-sized temporary of the read path (a fresh allocation per call would page-fault
        its memory in every time on the CPU)."""
        key = (like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers[key] = buf = None  # drop the old one first: never two at once
            self._buffers[key] = buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel]

    def _fill(self, views: list[torch.Tensor], gathered: list[torch.Tensor], keys: list[str], block: Block,
              mirror_of_previous: bool) -> None:
        """``views`` <- theta + block. The second block of a +-c pair of one seed is the reflection of the first
        through theta (no z evaluation): the two blocks see theta + d and theta - d for the same rounded d."""
        for v, theta, key in zip(views, gathered, keys):
            if mirror_of_previous:
                mirror(v.view(-1), theta.view(-1), compiled=self.compiled)
                continue
            tau = None if self.thresholds is None else self.thresholds[key]
            apply(v.view(-1), 0, [Term(stream_key(s, key), c) for s, c in block.terms], base=theta.view(-1),
                  mask_below=tau, distribution=self.distribution, compiled=self.compiled)

    def _embedding(self, m: torch.nn.Embedding, ids: torch.Tensor, key: str, blocks: Sequence[Block]) -> torch.Tensor:
        """The lookup of each block's ids in ``theta + block``, computed from the looked-up rows alone (the
        same values, element for element, as a lookup in the whole perturbed weight, mirrors included)."""
        theta = m.weight.data
        dim, K = theta.shape[1], len(blocks)
        b = ids.shape[0] // K
        tau = None if self.thresholds is None else self.thresholds[key]
        out = torch.empty((*ids.shape, dim), dtype=theta.dtype, device=theta.device)
        last = None
        for k in pair_order(blocks):
            rows_ids = ids[k * b:(k + 1) * b].reshape(-1)
            base = theta[rows_ids].reshape(-1)
            if _mirrors(blocks, last, k) and torch.equal(rows_ids, ids[last * b:(last + 1) * b].reshape(-1)):
                rows = out[last * b:(last + 1) * b].reshape(-1).clone()
                mirror(rows, base, compiled=self.compiled)
            else:
                idx = (rows_ids.to(torch.int64).unsqueeze(1) * dim + torch.arange(dim, device=ids.device)).reshape(-1)
                rows = perturbed_rows(base, idx, [Term(stream_key(s, key), c) for s, c in blocks[k].terms],
                                      mask_below=tau, distribution=self.distribution, compiled=self.compiled)
            out[k * b:(k + 1) * b] = rows.view(b, *ids.shape[1:], dim)
            last = k
        return out

    def _wrap(self, m: torch.nn.Module, forward: Callable, own: list[tuple[str, torch.nn.Parameter]]):
        plain_embedding = type(m) is torch.nn.Embedding and m.max_norm is None
        plain_linear = isinstance(m, torch.nn.Linear) and type(m).forward is torch.nn.Linear.forward
        keys = [key for key, _ in own]

        def read_forward(*args, **kwargs):
            blocks = self._blocks
            if blocks is None:  # evaluation, generation, anything outside a step: theta itself
                return forward(*args, **kwargs)
            K = len(blocks)
            n = _rows(args, kwargs)
            if n % K:
                raise ValueError(f"zo.perturb=forward: a module input has {n} rows, not a multiple of the {K} blocks; "
                                 "set zo.perturb=partition for this model")
            b = n // K
            if plain_embedding and len(args) == 1 and not kwargs:
                return self._embedding(m, args[0], keys[0], blocks)
            gathered = [p.data for _, p in own]
            buf = self._scratch(sum(t.numel() for t in gathered), gathered[0])
            views, off = [], 0
            for t in gathered:
                views.append(buf[off:off + t.numel()].view(t.shape))
                off += t.numel()
            out, outs = None, [None] * K
            if plain_linear and len(args) == 1 and not kwargs:
                x = args[0]
                out = torch.empty((*x.shape[:-1], m.out_features), dtype=x.dtype, device=x.device)
            try:
                for (_, p), v in zip(own, views):
                    p.data = v
                last = None
                for k in pair_order(blocks):
                    self._fill(views, gathered, keys, blocks[k], _mirrors(blocks, last, k))
                    last = k
                    rows = slice(k * b, (k + 1) * b)
                    if out is not None:  # straight into the stacked output: no concatenation of K outputs
                        _linear_into(out[rows], args[0][rows], m.weight, m.bias)
                    else:
                        outs[k] = forward(*_slice(args, n, rows.start, rows.stop),
                                          **{name: _slice(v, n, rows.start, rows.stop) for name, v in kwargs.items()})
            finally:
                # the gathered tensor must be back before DeepSpeed's post-forward hook releases it
                for (_, p), theta in zip(own, gathered):
                    p.data = theta
            return out if out is not None else _cat(outs)

        return read_forward


def pair_order(blocks: Sequence[Block]) -> list[int]:
    """Block indices with each block followed by its mirror (same seed, opposite coefficient), if any."""
    order, done = [], set()
    for k, blk in enumerate(blocks):
        if k in done:
            continue
        order.append(k)
        done.add(k)
        for j in range(k + 1, len(blocks)):
            if j not in done and _mirrors(blocks, k, j):
                order.append(j)
                done.add(j)
                break
    return order


def _mirrors(blocks: Sequence[Block], a: int | None, b: int) -> bool:
    """Whether block b is block a reflected through theta: one term each, same seed, opposite coefficient."""
    if a is None:
        return False
    ta, tb = blocks[a].terms, blocks[b].terms
    return len(ta) == len(tb) == 1 and ta[0][0] == tb[0][0] and ta[0][1] == -tb[0][1]


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``out <- F.linear(x, weight, bias)`` written in place, by the same ATen path F.linear takes
    (addmm over the flattened rows with a bias, matmul without), so the result is the same bits."""
    if bias is not None and x.is_contiguous() and x.dim() in (2, 3):
        torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.t(), out=out.view(-1, out.shape[-1]))
    elif bias is None:
        torch.matmul(x, weight.t(), out=out)
    else:
        out.copy_(torch.nn.functional.linear(x, weight, bias))
