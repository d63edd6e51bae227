"""The trajectory log: a run as its list of (seed, g, lr) records, and its replay.

A ZO run is fully described by its base weights and, per step, the seeds of
its perturbations and their projected gradients: the update is a pure function
of them (z is regenerated from the seed). The log is JSON Lines: a header
record, then one record per step, appended and fsynced by rank 0 as the step
completes, so a crash loses at most the step in flight and a torn last line is
detectable (it does not parse).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .rng import STREAM_VERSION

__all__ = ["StepRecord", "TrajectoryLog", "read_log", "FORMAT"]

FORMAT = "zo_deepspeed.trajectory/1"


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
    # the update this step applied, theta <- (1 - decay) theta + sum c z_seed, as [(seed, c), ...];
    # None in logs written before it was recorded (replay then assumes plain ZO-SGD)
    update: tuple | None = None
    decay: float = 0.0

    @property
    def q(self) -> int:
        return len(self.seeds)

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
                   update=(None if d.get("update") is None
                           else tuple((int(u[0]), float(u[1])) for u in d["update"])),
                   decay=float(d.get("decay", 0.0)))


@dataclass
class TrajectoryLog:
    """Append-only JSONL log. Only rank 0 holds a writable one."""

    path: Path
    header: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.exists() and self.path.stat().st_size > 0:
            head, _ = read_log(self.path)
            if head.get("format") != FORMAT:
                raise ValueError(f"{self.path} is not a zo_deepspeed trajectory log (format {head.get('format')!r})")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # the stream version: replaying needs the z stream that produced the log
            self._append({"format": FORMAT, "z_stream": STREAM_VERSION, **self.header})

    def _append(self, obj: dict | str) -> None:
        line = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def append(self, rec: StepRecord) -> None:
        from . import faults

        if faults.hit("log_torn", rec.step):  # crash test: half a record reaches the disk, then the process dies
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(rec.to_json()[:40])
                f.flush()
                os.fsync(f.fileno())
            faults.kill()
        self._append(rec.to_json())


def read_log(path: str | Path) -> tuple[dict, list[StepRecord]]:
    """Header and records of a log. A torn final line (crash mid-write) is dropped; a torn line
    anywhere else is corruption and raises."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trajectory log {path} does not exist; pass the trajectory.jsonl of a run")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"trajectory log {path} is empty")
    out: list[StepRecord] = []
    header: dict = {}
    for i, line in enumerate(lines):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # torn last record: the step it described never completed on disk
            raise ValueError(f"{path}:{i + 1}: corrupt record (not JSON) before the end of the log")
        if i == 0:
            header = d
        else:
            out.append(StepRecord.from_dict(d))
    return header, out


def iter_updates(records: Iterable[StepRecord]) -> Iterator[StepRecord]:
    for r in records:
        if not r.skipped:
            yield r
