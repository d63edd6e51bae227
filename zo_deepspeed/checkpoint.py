"""Checkpoints of ZO runs and exports to HF folders, written atomically.

DeepSpeed's save_checkpoint/load_checkpoint need an optimizer and can hang
ranks without one, so each rank saves its own pieces (and master/backup
copies) with safetensors. A checkpoint is written into a temporary folder and
renamed into place only after every rank's file is complete and fsynced, and
``latest`` is replaced atomically last: a crash at any point leaves the
previous checkpoint intact and never a half-written one that resume would read.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .partitions import iter_full_params

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "export_hf", "atomic_write_text",
           "CheckpointMismatch", "CheckpointInfo"]


class CheckpointMismatch(RuntimeError):
    """The checkpoint was written with another world size or layout (resume by replay instead)."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    extra: dict


def _world():
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier():
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """temp file + fsync + rename: readers see the old content or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_tensors(tensors: dict, path: Path) -> str:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _rank_file(r: int, w: int) -> str:
    return f"rank{r:05d}_of_{w:05d}.safetensors"


def save_checkpoint(engine, run_dir: Path, extra: dict | None = None) -> Path:
    """Collective. Flushes the pending update, then writes checkpoints/step_XXXXXXXX/."""
    engine.flush()
    rank, world = _world()
    step = engine.step_count
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    replica = engine.parts.kind == "replica"
    digest = None
    if rank == 0 or not replica:  # replicas are identical: rank 0 speaks for all
        tensors = {}
        with engine.parts.editing() as pieces:
            for pc in pieces:
                tensors[f"{pc.slot}|{pc.key}"] = pc.tensor.detach().cpu().clone()
        for (key, slot), b in engine.state.bases.items():
            tensors[f"base:{slot}|{key}"] = b.detach().cpu().clone()
        digest = _save_tensors(tensors, tmp / _rank_file(rank, world))
    digests = [None] * world
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_gather_object(digests, digest)
    else:
        digests = [digest]
    if rank == 0:
        state = {"step": step, "world_size": world, "layout": engine.parts.kind, "restore": engine.state.restore,
                 "files": {(_rank_file(r, world)): d for r, d in enumerate(digests) if d is not None},
                 "extra": extra or {}}
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name)
    _barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    p = Path(run_dir) / "checkpoints" / "latest"
    if not p.exists():
        return None
    ck = p.parent / p.read_text().strip()
    return ck if (ck / "state.json").exists() else None


def load_checkpoint(engine, ckpt: Path) -> CheckpointInfo:
    """Collective. Restores pieces and master/backup copies written at the same world size and layout."""
    rank, world = _world()
    state = json.loads((Path(ckpt) / "state.json").read_text())
    if state["world_size"] != world or state["layout"] != engine.parts.kind or state["restore"] != engine.state.restore:
        raise CheckpointMismatch(f"checkpoint {ckpt} was written at world size {state['world_size']} with layout "
                                 f"{state['layout']}/{state['restore']}; this run is {world} {engine.parts.kind}/"
                                 f"{engine.state.restore}")
    replica = engine.parts.kind == "replica"
    name = _rank_file(0 if replica else rank, world)
    path = Path(ckpt) / name
    if _sha256(path) != state["files"][name]:
        raise ValueError(f"checkpoint file {path} fails its checksum (corrupt or truncated); "
                         "delete the checkpoint folder to resume from the previous one")
    tensors = load_file(str(path))
    with engine.parts.editing() as pieces:
        for pc in pieces:
            pc.tensor.copy_(tensors[f"{pc.slot}|{pc.key}"])
    for (key, slot), b in engine.state.bases.items():
        b.copy_(tensors[f"base:{slot}|{key}"])
    engine.state.offset = []
    engine.pending = None
    engine.step_count = int(state["step"])
    return CheckpointInfo(Path(ckpt), int(state["step"]), state.get("extra", {}))


def export_hf(engine, out_dir: Path, tokenizer=None, max_shard_bytes: int = 2 << 30) -> Path:
    """Collective. Write an HF folder (safetensors shards + config + tokenizer) on rank 0.

    Parameters stream through :func:`iter_full_params` one layer at a time and
    are flushed to a shard file whenever the shard reaches ``max_shard_bytes``,
    so rank 0 never holds the whole model.
    """
    engine.flush()
    rank, _ = _world()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards: list[dict] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush_shard():
        name = f"model-{len(files) + 1:05d}.safetensors"
        _save_tensors({k: v.contiguous() for k, v in shards[-1].items()}, tmp / name)
        for k in shards[-1]:
            weight_map[k] = name
        files.append(name)
        shards[-1] = {}
        sizes[-1] = 0

    for name, t in iter_full_params(engine.module):
        if rank != 0:
            continue
        shards[-1][name] = t
        sizes[-1] += t.numel() * t.element_size()
        if sizes[-1] >= max_shard_bytes:
            flush_shard()
    if rank == 0:
        if shards[-1] or not files:
            flush_shard()
        if len(files) == 1:
            os.replace(tmp / files[0], tmp / "model.safetensors")
        else:
            total = sum((tmp / f).stat().st_size for f in files)
            atomic_write_text(tmp / "model.safetensors.index.json",
                              json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        engine.module.config.save_pretrained(tmp)
        gen = getattr(engine.module, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # noqa: BLE001 - an invalid generation config must not sink the export
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    _barrier()
    return out_dir
