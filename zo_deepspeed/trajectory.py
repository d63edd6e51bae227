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

A resume from a checkpoint at step n keeps only records 0..n-1 (:func:`read_prefix`, :func:`truncate`): they
must be whole and, when the checkpoint stored their :func:`records_digest`, be the ones it was trained with
(:func:`check_against_checkpoint`). What follows them ran after the checkpoint and runs again, so a torn or
damaged line there (a crash) is dropped with it and reported (:class:`Tail`); damage before step n is refused.
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

__all__ = ["StepRecord", "LogHeader", "TrajectoryLog", "Trajectory", "Tail", "LogError", "read_log", "read_prefix",
           "truncate", "model_fingerprint", "records_digest", "check_against_checkpoint", "FORMAT"]

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


class Tail(NamedTuple):
    """What a read that keeps only the first records (a resume to a checkpoint) found after them."""

    dropped: int            # lines after the kept records (records run after the checkpoint, or damaged)
    torn: bool              # the last line does not parse: a crash while it was written
    damaged: int | None     # 1-based line number of the first other line there that is not the next record

    def describe(self, path: Path, step: int) -> str:
        """One sentence for the console ('' when nothing was dropped)."""
        if not self.dropped:
            return ""
        what = [f"{path.name}: kept the {step} record(s) up to the checkpoint, dropped the {self.dropped} line(s) "
                "after them (those steps run again)"]
        if self.torn:
            what.append("the last line was a torn record (a crash while it was written)")
        if self.damaged is not None:
            what.append(f"line {self.damaged} was damaged (not the next step's record)")
        return "; ".join(what)


def _record(d: object, path: Path, lineno: int, expect: int) -> StepRecord:
    try:
        rec = StepRecord.from_dict(d)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise LogError(f"{path}:{lineno}: not a step record ({type(e).__name__}: {e}); restore the run's "
                       "trajectory.jsonl") from None
    if rec.step != expect:
        raise LogError(f"{path}:{lineno}: step {rec.step} where step {expect} belongs: the log is not contiguous "
                       "(edited or mixed from two runs) and cannot rebuild the run's weights; restore the run's "
                       "trajectory.jsonl")
    return rec


def _lines(path: Path) -> list[str]:
    if path.is_dir():
        raise LogError(f"trajectory log {path} is a directory; pass the run's trajectory.jsonl file")
    if not path.exists():
        raise FileNotFoundError(f"trajectory log {path} does not exist; pass the trajectory.jsonl of a run")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise LogError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); pass a run's "
                       "trajectory.jsonl") from None
    lines = text.splitlines()
    if not lines:
        raise LogError(f"trajectory log {path} is empty; pass the trajectory.jsonl of a run")
    return lines


def _parse(path: Path, keep: int | None = None) -> tuple[LogHeader, list[StepRecord], Tail]:
    """Header, records and what follows them. ``keep`` None: every record must parse and follow the one
    before (only a torn last line, a crash mid-write, is left out: ``Tail.torn``). ``keep`` n: the first n
    records are held to that, the lines after them are counted, not trusted (a resume from step n drops
    them)."""
    lines = _lines(path)
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        raise LogError(f"{path}:1: the header is not JSON; pass the trajectory.jsonl of a run") from None
    header = LogHeader.parse(head, str(path))
    body = lines[1:]
    n = len(body) if keep is None else min(keep, len(body))
    records: list[StepRecord] = []
    torn = False
    for i in range(n):
        lineno = i + 2
        try:
            d = json.loads(body[i])
        except json.JSONDecodeError:
            if i == len(body) - 1:
                torn = True  # torn last record: the step it described never completed on disk
                break
            raise LogError(f"{path}:{lineno}: corrupt record (not JSON) before the end of the log; restore the run's "
                           "trajectory.jsonl") from None
        records.append(_record(d, path, lineno, len(records)))
    rest = body[n:]
    damaged = None
    for j, line in enumerate(rest):
        lineno = n + j + 2
        try:
            _record(json.loads(line), path, lineno, n + j)
        except json.JSONDecodeError:
            if j == len(rest) - 1:
                torn = True
            elif damaged is None:
                damaged = lineno
        except LogError:
            if damaged is None:
                damaged = lineno
    return header, records, Tail(len(rest) + (1 if torn and not rest else 0), torn, damaged)


def read_log(path: str | Path, base: str | Path | None = None) -> Trajectory:
    """The verified header and records of a log (see the module docstring). A torn last line is left
    out; ``base``: the base model folder the log is about to be applied to (its fingerprint is checked)."""
    header, records, _ = _parse(Path(path))
    if base is not None:
        header.check_base(base, str(path))
    return Trajectory(header, records)


def read_prefix(path: str | Path, step: int) -> tuple[Trajectory, Tail]:
    """The header and first ``step`` records of a log (held to every check of :func:`read_log`), and what
    follows them: what a resume from a checkpoint at ``step`` keeps and drops."""
    header, records, tail = _parse(Path(path), keep=step)
    return Trajectory(header, records), tail


def records_digest(records) -> str:
    """sha256 over the records' canonical JSON lines: a checkpoint stores it for the records it was trained
    with, so that resume can tell an edited log, or another run's, from the run's own."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.to_json().encode() + b"\n")
    return h.hexdigest()


def check_against_checkpoint(path: str | Path, records, step: int, digest: str | None, ckpt_name: str) -> None:
    """The log agrees with a checkpoint of step ``step``: it holds at least ``step`` records, and (when the
    checkpoint recorded one) its first ``step`` records are the ones the checkpoint was trained with."""
    if len(records) < step:
        raise LogError(f"{path} holds {len(records)} step(s) but checkpoint {ckpt_name} is at step {step}: the log "
                       "lost records and can no longer rebuild the run; restore the run's trajectory.jsonl (or start a "
                       "new run from the checkpoint's export)")
    if digest is not None and records_digest(records[:step]) != digest:
        raise LogError(f"{path}: its first {step} records are not the ones checkpoint {ckpt_name} was trained with "
                       "(the log was edited or comes from another run); restore the run's trajectory.jsonl")


def truncate(path: str | Path, step: int, digest: str | None = None) -> Tail:
    """Keep the header and the records of steps < ``step`` (a resume from step ``step``: later records
    ran after the checkpoint and will run again, and a damaged line among them is dropped with them);
    rewritten atomically when anything is dropped. Refuses a log whose first ``step`` records are not
    whole, or (``digest``) not the checkpoint's. Returns what was dropped."""
    path = Path(path)
    (header, records), tail = read_prefix(path, step)
    check_against_checkpoint(path, records, step, digest, f"step_{step:08d}")
    if tail.dropped:
        atomic_write_text(path, "".join(line + "\n" for line in
                                        [json.dumps(header.to_dict(), separators=(",", ":"))] +
                                        [r.to_json() for r in records[:step]]))
    return tail


class TrajectoryLog:
    """Append-only writer (rank 0 only). A new file gets ``header``; an existing one is verified and
    continued (its own header stands), and every appended record must be the next step."""

    def __init__(self, path: str | Path, header: LogHeader | None = None):
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            self.header, records, tail = _parse(self.path)
            if tail.torn:
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
