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

from .distributed import barrier, world
from .faults import crash_point
from .fsutil import atomic_write_text, fsync_dir
from .partitions import iter_full_params
from .trajectory import LogError, Tail, check_against_checkpoint, read_prefix, records_digest

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "resume", "verify_resume", "export_hf",
           "CheckpointMismatch", "CheckpointInfo", "ResumePlan"]


@dataclass(frozen=True)
class ResumePlan:
    """What a resume of a run directory will do, verified before any model is built (:func:`verify_resume`)."""

    checkpoint: Path | None  # the latest complete checkpoint (None: none yet)
    step: int                # its step (0: the base weights)
    logged: int              # whole records in the log (steps 0..logged-1; 0 when there is no log)
    tail: Tail | None        # what a truncation to ``step`` drops (None: no log)
    digest: str | None       # the checkpoint's digest of records 0..step-1 (None: not recorded)


class CheckpointMismatch(RuntimeError):
    """The checkpoint was written with another world size or layout (resume by replay instead)."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path | None  # None: no checkpoint yet (the run starts from the base weights)
    step: int
    extra: dict
    how: str = "checkpoint"  # resume: "checkpoint" (its own tensors), "replay" (the log), "base" (none yet)


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


def save_checkpoint(engine, run_dir: Path, extra: dict | None = None, keep: int = 0) -> Path:
    """Collective. Flushes the pending update, then writes checkpoints/step_XXXXXXXX/: each rank's
    ``engine.local_tensors()`` (replicas: rank 0's only) and, in state.json, the layout, the files'
    sha256 and ``engine.state_dict()``.

    ``keep`` > 0: afterwards delete all but the newest ``keep`` complete checkpoints (a full checkpoint
    is the size of the model, so a long run saving every few hundred steps would fill the disk), never the
    one ``checkpoints/best`` names (the trainer's best-dev checkpoint, train.select)."""
    engine.flush()
    rank, size = world()
    step, layout = engine.step_count, engine.layout
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    digest = None
    if rank == 0 or layout.kind != "replica":  # replicas are identical: rank 0 speaks for all
        digest = _save_tensors(engine.local_tensors(), tmp / _rank_file(rank, size))
    crash_point("ckpt_files", step)
    digests = [digest]
    if size > 1:
        digests = [None] * size
        torch.distributed.all_gather_object(digests, digest)
    if rank == 0:
        state = {"step": step, **layout.to_dict(),
                 "files": {(_rank_file(r, size)): d for r, d in enumerate(digests) if d is not None},
                 "engine": engine.state_dict(), "extra": extra or {}}
        log = getattr(engine, "log", None)
        if log is not None:  # the records this checkpoint was trained with: resume checks the log against them
            (_, records), _ = read_prefix(log.path, step)
            check_against_checkpoint(log.path, records, step, None, final.name)
            state["log"] = {"file": log.path.name, "records": step, "sha256": records_digest(records)}
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        crash_point("ckpt_rename", step)
        # `final` exists only when this step is saved again (after a resume); a crash between these
        # two lines leaves `latest` naming a missing folder, and latest_checkpoint falls back
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        crash_point("ckpt_latest", step)
        atomic_write_text(root / "latest", final.name)
        if keep > 0:  # only once `latest` names the new one: a crash above leaves every older one
            done = sorted(d for d in root.glob("step_*") if (d / "state.json").exists())
            best = (root / "best").read_text().strip() if (root / "best").is_file() else None
            for old in done[:-keep]:
                if old != final and old.name != best:
                    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names; if that folder is gone (deleted as corrupt, or a crash while the
    same step was being saved again), the newest complete ``step_*`` folder. Temp folders never count."""
    p = Path(run_dir) / "checkpoints" / "latest"
    if not p.exists():
        return None
    ck = p.parent / p.read_text().strip()
    if (ck / "state.json").exists():
        return ck
    done = sorted(d for d in p.parent.glob("step_*") if (d / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(engine, ckpt: Path) -> CheckpointInfo:
    """Collective. Loads a checkpoint written at the engine's world size and layout into it: its
    tensors, then its state (``engine.load_state_dict``). Another layout: :class:`CheckpointMismatch`
    (nothing changed; :func:`resume` then rebuilds the weights from the log instead)."""
    state = _read_state(ckpt)
    _load_tensors(engine, ckpt, state)
    engine.load_state_dict(state["engine"])
    return CheckpointInfo(Path(ckpt), int(state["step"]), state.get("extra", {}))


def verify_resume(run_dir: Path, base: str | Path | None = None, adapter: dict | None = None,
                  log_name: str = "trajectory.jsonl") -> ResumePlan:
    """Read-only check that a run directory can be resumed, before any model is built: the latest
    checkpoint's state parses, and the trajectory log (the run's ground truth) is whole up to the
    checkpoint's step and holds the records the checkpoint was trained with; ``base`` (the model folder)
    is the base model the log was recorded on; ``adapter`` (an AdapterConfig as a dict) is the run's.
    Records after the checkpoint, a torn last line among them, are what a resume drops (they run again)."""
    run_dir = Path(run_dir)
    last = latest_checkpoint(run_dir)
    state = _read_state(last) if last is not None else None
    step = int(state["step"]) if state is not None else 0
    digest = ((state.get("log") or {}).get("sha256")) if state is not None else None
    log = run_dir / log_name
    if not log.exists() or (log.is_file() and log.stat().st_size == 0):  # empty: a crash before its header
        if last is not None:
            raise LogError(f"{log} is missing but {last.name} (step {step}) exists: the log is the run's ground truth "
                           f"(replay, resume at another layout); restore it, or start a new run from this run's "
                           f"export (model.path={run_dir / 'export'})")
        return ResumePlan(None, 0, 0, None, None)
    (header, records), tail = read_prefix(log, step)
    check_against_checkpoint(log, records, step, digest, last.name if last is not None else "(none)")
    if base is not None:
        header.check_base(base, str(log))
    if adapter is not None:
        from .adapters import AdapterConfig

        was, now = AdapterConfig.from_dict(header.adapter), AdapterConfig.from_dict(adapter)
        if was != now and "none" not in (was.mode, now.mode) or was.mode != now.mode:
            diff = [f"adapter.{k}={getattr(was, k)!r} (now {getattr(now, k)!r})" for k in was.to_dict()
                    if getattr(was, k) != getattr(now, k)]
            raise ValueError(f"{run_dir} was trained with {', '.join(diff[:3])}: a resume continues the run's own "
                             "adapter; drop the adapter.* overrides (or start a new run)")
    return ResumePlan(last, step, len(records) + tail.dropped - (1 if tail.torn else 0), tail, digest)


def resume(engine, run_dir: Path) -> CheckpointInfo:
    """Collective. Bring ``engine`` (built on the base weights) to the run's latest checkpoint: the one
    path every resume takes. The weights come from the checkpoint's own tensors when it was written at
    this world size and layout, else from the run's trajectory log replayed up to its step (verified
    against the checkpoint first: :func:`verify_resume`); the state comes from the checkpoint's
    ``engine.state_dict()`` either way. A training resume verifies the log up front as well (the trainer
    calls :func:`verify_resume` before it builds the engine); an export needs no log at the same layout."""
    last = latest_checkpoint(run_dir)
    if last is None:
        return CheckpointInfo(None, 0, {}, "base")
    state = _read_state(last)
    try:
        _load_tensors(engine, last, state)
        how = "checkpoint"
    except CheckpointMismatch:
        step = int(state["step"])
        plan = verify_resume(run_dir)
        if plan.checkpoint != last:
            raise ValueError(f"{run_dir}: the latest checkpoint changed while it was read; run again") from None
        (_, records), _ = read_prefix(Path(run_dir) / "trajectory.jsonl", step)
        engine.replay(records[:step])
        how = "replay"
    engine.load_state_dict(state["engine"])
    return CheckpointInfo(last, int(state["step"]), state.get("extra", {}), how)


def _read_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["step"]), int(state["world_size"]), state["layout"], state["restore"]
        if not isinstance(state["files"], dict) or not isinstance(state["engine"], dict):
            raise TypeError
        return state
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{path} is damaged (not the JSON state of a checkpoint); delete {Path(ckpt)} to resume "
                         "from the previous checkpoint") from None


def _load_tensors(engine, ckpt: Path, state: dict) -> None:
    rank, size = world()
    layout = engine.layout
    if {k: state[k] for k in ("world_size", "layout", "restore")} != layout.to_dict():
        raise CheckpointMismatch(f"checkpoint {ckpt} was written at world size {state['world_size']} with layout "
                                 f"{state['layout']}/{state['restore']}; this run is {size} {layout.kind}/"
                                 f"{layout.restore}")
    replica = layout.kind == "replica"
    name = _rank_file(0 if replica else rank, size)
    path = Path(ckpt) / name
    ok = path.exists() and _sha256(path) == state["files"].get(name)
    # every rank learns whether any rank's file is bad, so all stop with the same message (no rank is
    # left waiting in a collective for one that raised)
    oks = [ok]
    if size > 1:
        oks = [ok] * size
        torch.distributed.all_gather_object(oks, ok)
    bad = [_rank_file(0 if replica else r, size) for r, o in enumerate(oks) if not o]
    if bad:
        raise ValueError(f"checkpoint {ckpt}: {', '.join(sorted(set(bad)))} missing or fails its sha256 checksum "
                         f"(corrupt or truncated); delete {ckpt} to resume from the previous checkpoint")
    try:
        engine.load_local_tensors(load_file(str(path)))
    except KeyError as e:  # another model or adapter than the run's (same layout)
        raise ValueError(f"checkpoint {ckpt} has no tensor {e.args[0]!r} of this run's model: it was written for "
                         "another model or adapter; resume with the run's own model.path and adapter settings") \
            from None
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ValueError(f"checkpoint {ckpt} does not fit this run's model ({first}); resume with the run's own "
                         "model.path and adapter settings") from None


def export_hf(engine, out_dir: Path, tokenizer=None, max_shard_bytes: int = 2 << 30) -> Path:
    """Collective. Write an HF folder (safetensors shards + config + tokenizer) on rank 0.

    Parameters stream through :func:`iter_full_params` one layer at a time and
    are flushed to a shard file whenever the shard reaches ``max_shard_bytes``,
    so rank 0 never holds the whole model. A LoRA run exports merged weights, a
    prefix run a peft adapter folder (see :mod:`zo_deepspeed.adapters`).
    """
    from .adapters import export_view

    engine.flush()
    view = export_view(engine.module)  # None: no adapter
    stem = view.stem if view else "model"
    from .guard import MARKER, OutputRefused, check_output_dir, marker_text

    rank, size = world()
    out_dir = Path(out_dir)
    # never replace a folder this project did not write (a model folder, the user's files): rank 0 decides
    refusal = [None]
    if rank == 0:
        try:
            check_output_dir(out_dir, "out_dir")
        except OutputRefused as e:
            refusal = [str(e)]
    if size > 1:
        torch.distributed.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise OutputRefused(refusal[0])
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    shards: list[dict] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush_shard():
        name = f"{stem}-{len(files) + 1:05d}.safetensors"
        _save_tensors({k: v.contiguous() for k, v in shards[-1].items()}, tmp / name)
        for k in shards[-1]:
            weight_map[k] = name
        files.append(name)
        shards[-1] = {}
        sizes[-1] = 0

    for name, t in (view.params if view else iter_full_params(engine.module)):
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
            os.replace(tmp / files[0], tmp / f"{stem}.safetensors")
        else:
            total = sum((tmp / f).stat().st_size for f in files)
            atomic_write_text(tmp / f"{stem}.safetensors.index.json",
                              json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if view:
            view.write_config(tmp)
        else:
            engine.module.config.save_pretrained(tmp)
        gen = None if view else getattr(engine.module, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception:  # noqa: BLE001 - an invalid generation config must not sink the export
                pass
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / MARKER, marker_text("export", step=engine.step_count))
        crash_point("export", engine.step_count)
        # a folder cannot be swapped atomically: move the old export aside, the new one in, then delete
        # the old. A crash in between leaves complete .NAME.old and .NAME.tmp folders, never a mixed one.
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(old, ignore_errors=True)
    barrier()
    return out_dir
