"""Where each rank's trainable elements live. The only module that reads DeepSpeed internals.

A :class:`Piece` is a 1-D tensor view of elements this rank may edit in place,
with the global flat index of its first element in the parameter. The trainer
only ever sees pieces, so every layout below reduces to the same fused pass:

* **replica** (no DeepSpeed, or ZeRO stage 0): one piece per parameter, the
  whole ``p.data``; every rank applies the identical full update.
* **ZeRO-3**: rank r owns flat elements ``[r*ps, min((r+1)*ps, numel))`` of the
  parameter, stored at the start of ``p.ds_tensor`` (length ``ps``). The tail
  beyond ``numel`` is padding with undefined contents: never a piece.
* **ZeRO-3 + offload_param cpu**: same, ``ds_tensor`` lives in host memory; we
  edit it there.
* **ZeRO++ hpZ**: after the first gather, forwards gather from
  ``p.ds_secondary_tensor`` (this rank's slice of the parameter within its
  hpZ group), so that slice is a piece too. Every piece receives the same
  elementwise edits from the same starting values, so the copies stay equal.
* **persistent parameters** (``numel <= stage3_param_persistence_threshold``):
  after a forward they stay gathered in ``p.data``, a separate full copy that
  ignores ``ds_tensor`` edits at world size >= 2. :meth:`Partitions.editing`
  releases them first (what DeepSpeed's own ZeRO-3 optimizer does before its
  step); the next forward re-gathers the edited values.
* **NVMe offload**: a swapped-out ``ds_tensor`` is a 0-dim placeholder; pieces
  are swapped in in batches that fit DeepSpeed's swap buffers, edited, and
  swapped out again.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["Piece", "Partitions", "gather_state_dict", "iter_full_params", "full_shape", "is_partitioned", "assign_full",
           "gathered_bytes"]


@dataclass(frozen=True)
class Piece:
    key: str             # parameter name, the stream key
    tensor: torch.Tensor  # 1-D view into storage this rank owns
    start: int           # global flat index of tensor[0]
    numel: int           # full parameter size
    ndim: int            # full parameter rank (weight decay applies to ndim >= 2)
    slot: str = "primary"  # "primary" | "secondary" (hpZ copy) | "replica"


def is_partitioned(p: torch.nn.Parameter) -> bool:
    """Whether ZeRO-3 owns ``p`` (its ``p.data`` is then an empty placeholder between gathers)."""
    return hasattr(p, "ds_tensor")


def full_shape(p: torch.nn.Parameter) -> torch.Size:
    """The parameter's logical shape, partitioned or not."""
    return p.ds_shape if is_partitioned(p) else p.shape


@torch.no_grad()
def assign_full(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Set a whole parameter to ``value`` (its full shape). Partitioned: gathered, written on rank 0 and
    scattered back into every rank's partition (collective: every rank calls it in the same order)."""
    if is_partitioned(p):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))
    else:
        p.data.copy_(value.to(p.device, p.dtype).view_as(p.data))


def _trainable(module: torch.nn.Module):
    # named_parameters() de-duplicates tied weights (embedding/lm_head), so a
    # tied tensor is perturbed once, under its first name.
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


class Partitions:
    """Local pieces of a module, plus the edit protocol its layout needs."""

    def __init__(self, module: torch.nn.Module, engine=None):
        self.module = module
        self.engine = engine
        self.params = _trainable(module)
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
        self.zero3 = any(hasattr(p, "ds_tensor") for _, p in self.params)
        self.nvme = self.zero3 and any(getattr(p, "nvme_swapper", None) is not None for _, p in self.params)
        self.hpz = self.zero3 and self._hpz_group_size() > 1
        if self.hpz:
            self._materialize_secondaries()

    # -- layout ---------------------------------------------------------------
    @property
    def kind(self) -> str:
        if not self.zero3:
            return "replica"
        return "zero3-nvme" if self.nvme else ("zero3-hpz" if self.hpz else "zero3")

    def _hpz_group_size(self) -> int:
        p = self.params[0][1]
        return int(getattr(p, "ds_secondary_tensor_group_size", 1) or 1) if self.engine is not None and \
            getattr(self.engine, "zero_hpz_partition_size", lambda: 1)() > 1 else 1

    def _materialize_secondaries(self) -> None:
        # Secondary (hpZ) copies are created lazily at the first release after a
        # gather. Create them now, one module at a time, so that every copy a
        # forward can read exists before the first edit and starts equal to the
        # primary partition.
        import deepspeed

        for m in self.module.modules():
            own = [p for p in m.parameters(recurse=False)]
            if own:
                with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
                    pass
        for n, p in self.params:
            if p.ds_secondary_tensor is None:
                raise RuntimeError(f"ZeRO++ hpZ: no secondary partition for {n} after a gather")

    full_shape = staticmethod(full_shape)

    def _pieces_of(self, name: str, p: torch.nn.Parameter) -> list[Piece]:
        shape = self.full_shape(p)
        if not hasattr(p, "ds_tensor"):
            return [Piece(name, p.data.view(-1), 0, p.numel(), len(shape), "replica")]
        numel = p.ds_numel
        ps = p.ds_tensor.ds_numel
        rank = p.ds_zero_partition_rank if hasattr(p, "ds_zero_partition_rank") else \
            torch.distributed.get_rank(group=p.ds_process_group)
        start = rank * ps
        n_valid = max(0, min(numel - start, ps))
        out = [Piece(name, p.ds_tensor.data.view(-1)[:n_valid], start, numel, len(shape), "primary")]
        if self.hpz:
            sec = p.ds_secondary_tensor
            ss = sec.ds_numel
            r = torch.distributed.get_rank(group=p.ds_zero_param_process_group)
            s_start = r * ss
            s_valid = max(0, min(numel - s_start, ss))
            out.append(Piece(name, sec.data.view(-1)[:s_valid], s_start, numel, len(shape), "secondary"))
        return [pc for pc in out if pc.tensor.numel() > 0]

    def local_numel(self) -> int:
        """Elements this rank edits per pass (all pieces, hpZ copies included)."""
        total = 0
        for n, p in self.params:
            if hasattr(p, "ds_tensor"):
                numel, ps = p.ds_numel, p.ds_tensor.ds_numel
                rank = torch.distributed.get_rank(group=p.ds_process_group)
                total += max(0, min(numel - rank * ps, ps))
            else:
                total += p.numel()
        return total

    # -- edit protocol ----------------------------------------------------------
    def _release_gathered(self) -> None:
        # Persistent params keep a full gathered copy in p.data across forwards;
        # release it so the next forward re-gathers from the edited partition.
        if self.zero3 and self.engine is not None:
            self.engine.optimizer.partition_all_parameters()

    @contextmanager
    def editing(self) -> Iterator[Iterator[Piece]]:
        """Context yielding an iterator over pieces that are safe to edit in place.

        Pieces must be consumed inside the context: with NVMe offload each
        batch is swapped out (written back) before the next is swapped in.
        """
        self._release_gathered()
        if self.nvme:
            yield self._nvme_pieces()
        else:
            yield (pc for n, p in self.params for pc in self._pieces_of(n, p))

    def _nvme_pieces(self) -> Iterator[Piece]:
        from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

        swapper = next(p.nvme_swapper for _, p in self.params if p.nvme_swapper is not None)
        swapper.synchronize_reads()
        in_memory = [(n, p) for n, p in self.params if p.ds_tensor.final_location is None
                     or p.ds_tensor.status == PartitionedParamStatus.AVAILABLE]
        swapped = [(n, p) for n, p in self.params if (n, p) not in in_memory]
        for n, p in in_memory:
            yield from self._pieces_of(n, p)
        # batch by what the swap buffers can hold
        batch: list = []
        for item in swapped + [None]:
            full = item is None or len(batch) >= max(1, swapper.available_swap_in_buffers())
            if batch and full:
                params = [p for _, p in batch]
                swapper.swap_in(params, async_op=False)
                for n, p in batch:
                    yield from self._pieces_of(n, p)
                swapper.swap_out_and_release(params)
                batch = []
            if item is not None:
                batch.append(item)


@torch.no_grad()
def iter_full_params(module: torch.nn.Module, rank0_only: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full CPU tensor) for every parameter, one module's own parameters at a time.

    Under ZeRO-3 each module's parameters are gathered, copied to host memory
    and released before the next module, so no rank holds more than one layer
    beyond its own partition. Collective: every rank must exhaust the iterator;
    only rank 0 receives tensors unless ``rank0_only`` is False.
    """
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    keep = rank == 0 or not rank0_only
    seen: set[int] = set()
    for mname, m in module.named_modules():
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        if hasattr(own[0][1], "ds_tensor"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
                copies = [(n, p.data.detach().cpu().clone()) for n, p in own] if keep else []
        else:
            copies = [(n, p.data.detach().cpu().clone()) for n, p in own] if keep else []
        for n, t in copies:
            yield (f"{mname}.{n}" if mname else n), t


def gather_state_dict(module: torch.nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU state dict (rank 0; empty elsewhere). For small models and tests; exports stream
    through :func:`iter_full_params` instead."""
    return dict(iter_full_params(module, rank0_only))


_shm_released = False


def release_cpu_shm_names() -> None:
    """Unlink this rank's name of DeepSpeed's CPU shared-memory all-reduce buffer.

    On the CPU accelerator, DeepSpeed's comm backend creates one ~66 MB POSIX
    shm segment per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``,
    maps every peer's, and never unlinks them: each launch leaves them behind
    in RAM-backed /dev/shm (measured here: 12 GB after a day of test runs).
    Once every rank has mapped every peer's segment (the barrier), the names
    can go: the mappings stay valid until the processes exit, and then the
    memory is freed. Collective on the CPU accelerator; a no-op elsewhere.
    """
    global _shm_released
    if _shm_released or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    _shm_released = True
    torch.distributed.barrier()  # every rank has finished mapping its peers' buffers
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{torch.distributed.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass  # not created (ranks on several nodes, or an older DeepSpeed): nothing leaked


def gathered_bytes() -> int | None:
    """All-gather bytes DeepSpeed's comms logger recorded since the last call (per rank, as it counts
    them: the input partitions), then its records cleared so they never grow over a long run. None
    when the logger is off."""
    import deepspeed.comm as dscomm

    logger = getattr(dscomm, "comms_logger", None)
    if logger is None or not logger.enabled:
        return None
    raw = logger.get_raw_data()
    logger.reset_data()
    return int(sum(size * rec[0] for op, sizes in raw.items() if "all_gather" in op or "allgather" in op
                   for size, rec in sizes.items()))
