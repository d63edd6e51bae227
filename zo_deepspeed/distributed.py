"""The torch.distributed plumbing every module shares: joining the process group, this rank's place in
it, the scalar all-reduce, and the one rule for which part of a batch a rank takes.

Nothing here reads DeepSpeed internals (that is partitions.py); ``setup`` only calls DeepSpeed's public
``init_distributed`` so that every launcher (deepspeed, torchrun, srun, plain python) works the same.
"""
from __future__ import annotations

import os
import socket
from typing import Sequence, TypeVar

import torch

__all__ = ["setup", "world", "barrier", "all_reduce", "shard_range", "shard", "shard_batch"]

T = TypeVar("T")


def setup() -> tuple[int, int]:
    """Join the process group the launcher set up; plain ``python`` runs as a world of one."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if not torch.distributed.is_initialized():
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from .console import drop_stdout_lines

        # DeepSpeed's CPU backend prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
        # successfully" on every rank, at every start, once the op is cached too
        with drop_stdout_lines("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built"):
            deepspeed.init_distributed(dist_backend=None)
        if get_accelerator().device_name() == "cpu" and torch.distributed.get_rank() == 0:
            print(f"[zo_deepspeed] no GPU found: DeepSpeed runs on the CPU ({torch.distributed.get_backend()}), "
                  f"{torch.distributed.get_world_size()} rank(s)", flush=True)
    return world()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def all_reduce(t: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of ``t`` over ranks, returned on the host. A host sync point.

    Under gloo the reduction runs on the host; under NCCL the tensor visits ``device`` (the rank's
    accelerator) for the collective. A world of one returns ``t`` itself.
    """
    if world()[1] == 1:
        return t
    dev = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else torch.device(device)
    buf = t.to(dev)
    torch.distributed.all_reduce(buf)
    return buf.cpu()


def shard_range(n: int, rank: int, size: int) -> range:
    """Indices of rank ``rank``'s contiguous share of ``n`` items: the first ``n % size`` ranks take one
    more (``torch.tensor_split``'s rule). The one sharding rule of batches and evaluation sets."""
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))


def shard(items: Sequence[T], rank: int | None = None, size: int | None = None) -> list[T]:
    """This rank's (or ``rank``'s) contiguous share of ``items`` (see :func:`shard_range`)."""
    if rank is None or size is None:
        rank, size = world()
    return [items[i] for i in shard_range(len(items), rank, size)]


def shard_batch(batch: dict, rank: int | None = None, size: int | None = None) -> dict:
    """This rank's rows of a batch of tensors (every tensor split along dim 0 by :func:`shard_range`)."""
    if rank is None or size is None:
        rank, size = world()
    n = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    idx = torch.tensor(list(shard_range(n, rank, size)), dtype=torch.long)
    return {k: (v[idx] if torch.is_tensor(v) else v) for k, v in batch.items()}
