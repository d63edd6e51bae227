"""The trajectory log: a run as its list of (seed, g, lr) records. This module owns the format: it
builds the header, writes records, reads and verifies a log, and truncates it.

A ZO run is fully described by its base weights and, per step, the seeds of its perturbations and the
exact (seed, coefficient) streams its update applied (z is regenerated from the seed). The log is JSON
Lines: a header record, then one record per step, appended and fsynced by rank 0 as the step
completes, so a crash loses at most the step in flight and a torn last line is detectable (it does
not parse).

Every reader goes through :func:`read_log`, which verifies the format, the z-stream version (a log
replayed with another stream would give other weights without any error), that the records parse
and that their steps run 0, 1, 2, ... without a gap, and, given the base model's folder, that the
log was recorded on those weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from .fsutil import atomic_write_text
from .rng import STREAM_VERSION

__all__ = ["StepRecord", "LogHeader", "TrajectoryLog", "Trajectory", "LogError", "read_log", "truncate",
           "model_fingerprint", "FORMAT"]

FORMAT = "zo_deepspeed.trajectory/1"


class LogError(ValueError):
    """A trajectory log that cannot be trusted; the message names the file and the fix."""


@dataclass(frozen=True)
class LogHeader:
    """The first line of a log: what replaying it needs besides the records."""

    zo: dict                     # the run's ZOConfig as a dict (distribution, restore mode, ...)
    restore: str                 # the resolved restore mode (auto resolved by the partition dtype)
    world_size: int | None = None
    adapter: dict | None = None  # AdapterConfig as a dict; None or mode none: full-parameter
    model: str | None = None     # model.path as given (informational)
    task: str | None = None
    base_fingerprint: str | None = None  # model_fingerprint of the base weights (None: not recorded)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "z_stream": STREAM_VERSION, **asdict(self)}

    @classmethod
    def parse(cls, d: object, source: str) -> "LogHeader":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise LogError(f"{source} is not a zo_deepspeed trajectory log (format {got!r}); pass the "
                           "trajectory.jsonl of a run")
        if d.get("z_stream") != STREAM_VERSION:
            raise LogError(f"{source} was written with z stream {d.get('z_stream')!r}; this zo_deepspeed generates "
                           f"{STREAM_VERSION!r}: replay it with the zo_deepspeed version that wrote it")
        if not isinstance(d.get("zo"), dict) or "restore" not in d:
            raise LogError(f"{source}: the header lacks the run's zo settings; was it written by zo_deepspeed?")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def check_base(self, model_dir: str | Path, source: str) -> None:
        """Refuse a base model other than the one the log was recorded on (garbage weights otherwise)."""
        if self.base_fingerprint is None:
            return  # logs written by the library without a model folder carry none: nothing to check
        have = model_fingerprint(model_dir)
        if have != self.base_fingerprint:
            raise LogError(f"{source} was recorded on another base model (model.path={self.model}, weights "
                           f"fingerprint {self.base_fingerprint[:12]}), not {model_dir} "
                           f"({(have or 'no weights')[:12]}); replay it onto the run's own base model")


@dataclass(frozen=True)
class StepRecord:
    step: int
    seeds: tuple[int, ...]
    g: tuple[float, ...]          # projected gradient per perturbation (0 when skipped)
    lr: float
    weight_decay: float
    eps: float
    loss_plus: float
    loss_minus: float
    skipped: bool = False
    example_ids: tuple = ()
    # the update this step applied, theta <- (1 - decay) theta + sum c z_seed, as ((seed, c), ...):
    # replay applies it as written, whatever rule produced it
    update: tuple[tuple[int, float], ...] = ()
    decay: float = 0.0
    losses: tuple[float, ...] = ()  # every block's loss (zo_deepspeed/estimators.py); logs before it: ()

    @property
    def q(self) -> int:
        return len(self.seeds)

    @classmethod
    def from_result(cls, res, *, eps: float, weight_decay: float, example_ids=()) -> "StepRecord":
        """The record of an engine step (a :class:`zo_deepspeed.engine.StepResult`)."""
        return cls(step=res.step, seeds=tuple(res.seeds), g=tuple(res.g), lr=res.lr, weight_decay=weight_decay,
                   eps=eps, loss_plus=res.loss_plus, loss_minus=res.loss_minus, skipped=res.skipped,
                   example_ids=tuple(example_ids), update=tuple(res.update), decay=res.decay,
                   losses=tuple(res.losses))

    def to_json(self) -> str:
        d = asdict(self)
        d["q"] = self.q
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "StepRecord":
        return cls(step=int(d["step"]), seeds=tuple(int(s) for s in d["seeds"]), g=tuple(float(x) for x in d["g"]),
                   lr=float(d["lr"]), weight_decay=float(d["weight_decay"]), eps=float(d["eps"]),
                   loss_plus=float(d["loss_plus"]), loss_minus=float(d["loss_minus"]),
                   skipped=bool(d.get("skipped", False)), example_ids=tuple(d.get("example_ids", ())),
                   update=tuple((int(u[0]), float(u[1])) for u in d["update"]), decay=float(d.get("decay", 0.0)),
                   losses=tuple(float(x) for x in d.get("losses", ())))


class Trajectory(NamedTuple):
    header: LogHeader
    records: list[StepRecord]


def _parse(path: Path) -> tuple[LogHeader, list[StepRecord], bool]:
    """Header, records, and whether a torn last line (a crash mid-write) was dropped."""
    if path.is_dir():
        raise LogError(f"trajectory log {path} is a directory; pass the run's trajectory.jsonl file")
    if not path.exists():
        raise FileNotFoundError(f"trajectory log {path} does not exist; pass the trajectory.jsonl of a run")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LogError(f"{path} is not a text trajectory log ({e.reason} at byte {e.start})") from None
    if not lines:
        raise LogError(f"trajectory log {path} is empty")
    records: list[StepRecord] = []
    header = None
    torn = False
    for i, line in enumerate(lines):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1 and i > 0:
                torn = True  # torn last record: the step it described never completed on disk
                break
            raise LogError(f"{path}:{i + 1}: corrupt record (not JSON) before the end of the log") from None
        if i == 0:
            header = LogHeader.parse(d, str(path))
            continue
        try:
            rec = StepRecord.from_dict(d)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise LogError(f"{path}:{i + 1}: not a step record ({type(e).__name__}: {e})") from None
        if rec.step != len(records):
            raise LogError(f"{path}:{i + 1}: step {rec.step} where step {len(records)} belongs: the log is not "
                           "contiguous (edited or mixed from two runs) and cannot rebuild the run's weights")
        records.append(rec)
    return header, records, torn


def read_log(path: str | Path, base: str | Path | None = None) -> Trajectory:
    """The verified header and records of a log (see the module docstring). A torn last line is left
    out; ``base``: the base model folder the log is about to be applied to (its fingerprint is checked)."""
    header, records, _ = _parse(Path(path))
    if base is not None:
        header.check_base(base, str(path))
    return Trajectory(header, records)


def truncate(path: str | Path, step: int) -> bool:
    """Keep the header and the records of steps < ``step`` (a resume from step ``step``: later records
    ran after the checkpoint and will run again); rewritten atomically. Refuses a log that holds
    fewer than ``step`` records. Returns whether a torn last line was dropped."""
    path = Path(path)
    header, records, torn = _parse(path)
    if len(records) < step:
        raise LogError(f"{path} holds {len(records)} steps but the checkpoint is at step {step}: the log "
                       "lost records and can no longer rebuild the run; restore the run's trajectory.jsonl")
    if torn or len(records) > step:
        atomic_write_text(path, "".join(line + "\n" for line in
                                        [json.dumps(header.to_dict(), separators=(",", ":"))] +
                                        [r.to_json() for r in records[:step]]))
    return torn


class TrajectoryLog:
    """Append-only writer (rank 0 only). A new file gets ``header``; an existing one is verified and
    continued (its own header stands), and every appended record must be the next step."""

    def __init__(self, path: str | Path, header: LogHeader | None = None):
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            self.header, records, torn = _parse(self.path)
            if torn:
                raise LogError(f"{self.path} ends in a torn record; resume the run (it repairs the log) "
                               "before appending to it")
            self.next_step = len(records)
        else:
            if header is None:
                raise LogError(f"{self.path} does not exist yet: a new trajectory log needs its header")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.header, self.next_step = header, 0
            self._append(json.dumps(header.to_dict(), separators=(",", ":")))

    def _append(self, line: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, rec: StepRecord) -> None:
        from . import faults

        if rec.step != self.next_step:
            raise LogError(f"{self.path}: record of step {rec.step} appended where step {self.next_step} belongs")
        if faults.hit("log_torn", rec.step):  # crash test: half a record reaches the disk, then the process dies
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(rec.to_json()[:40])
                f.flush()
                os.fsync(f.fileno())
            faults.kill()
        self._append(rec.to_json())
        self.next_step += 1


def model_fingerprint(path: str | Path) -> str | None:
    """A content fingerprint of an HF model folder's weight files, stored in the log header so that
    replay refuses a log recorded on another base model.

    sha256 over each weight file's name, size and 64 evenly spaced 64 KiB blocks (the first holds the
    safetensors header: names, shapes, dtypes). Another size or another fine-tune of the same
    architecture differs in them; hashing whole files would read the whole model (minutes at 60 GB).
    None when the folder has no safetensors/bin weight files.
    """
    files = sorted(f for f in Path(path).iterdir()
                   if f.is_file() and (f.suffix == ".safetensors" or (f.suffix == ".bin" and "model" in f.name)))
    if not files:
        return None
    h = hashlib.sha256()
    block, n_blocks = 1 << 16, 64
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(n_blocks):
                fh.seek((size - block) * i // (n_blocks - 1) if size > block else 0)
                h.update(fh.read(block))
    return h.hexdigest()
