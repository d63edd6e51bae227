"""A run's metrics: one JSON line per event in ``metrics.jsonl``, mirrored into DeepSpeed's monitors
(CSV, TensorBoard) under ``zo/<name>``, and the console progress bar. Rank 0 only.

This module owns the file: it writes it (MetricsLog), reads it (read_metrics) and, on resume, cuts it
back to the checkpoint (truncate), so that the log describes the run's one trajectory: each step's
record once, whatever stretches and crashes the run went through. DeepSpeed's monitor files are
append-only (a resumed run's TensorBoard shows the rerun steps twice; the last value is the one kept)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .fsutil import atomic_write_text, read_text

__all__ = ["MetricsLog", "read_metrics", "truncate"]


class MetricsLog:
    def __init__(self, run_dir: Path, ds_monitor=None, total_steps: int = 0, start_step: int = 0,
                 progress: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.monitor = ds_monitor if getattr(ds_monitor, "enabled", False) else None
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="zo", unit="step", dynamic_ncols=True)

    def write(self, rec: dict) -> None:
        """Append ``rec`` (it must hold "step") with a wall-clock time."""
        rec = {**rec, "time": time.time()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.monitor is not None:
            self.monitor.write_events([(f"zo/{k}", float(v), rec["step"]) for k, v in rec.items()
                                       if k not in ("step", "time") and isinstance(v, (int, float))])

    def step(self, res) -> None:
        """One training step's record, and the progress bar."""
        self.write({"step": res.step + 1, "loss": res.loss, "g": res.g[0], "lr": res.lr, "skipped": res.skipped,
                    **(res.profile.metrics() if res.profile is not None else {})})
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{res.loss:.4f}", g=f"{res.g[0]:+.3g}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def read_metrics(path: Path) -> tuple[list[dict], bool]:
    """The records of a metrics.jsonl, and whether its last line was torn (a crash mid-write: skipped). Any
    other malformed line is an error naming the file and line."""
    path = Path(path)
    lines = read_text(path, "metrics file").splitlines()
    recs, torn = [], False
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            if i == len(lines):
                torn = True
                continue
            raise ValueError(f"{path}:{i}: not a JSON record ({getattr(e, 'msg', e)}); pass the metrics.jsonl "
                             "of a run (or delete that line)") from None
        if not isinstance(r, dict) or not isinstance(r.get("step"), int):
            raise ValueError(f"{path}:{i}: not a metrics record (an object with a 'step'); pass the metrics.jsonl "
                             "of a run (or delete that line)")
        recs.append(r)
    return recs, torn


def _survives_resume(rec: dict, step: int) -> bool:
    """Whether a record stays when the run resumes from its checkpoint of step ``step``."""
    if "loss" in rec or any(k.startswith("dev/") for k in rec):
        # the loop's records (a step, its dev evaluation): those of steps up to the checkpoint produced the
        # weights it holds; later ones ran after it and run again
        return rec["step"] <= step
    if rec["step"] == 0 and any(k.startswith("test/") for k in rec):
        return step > 0  # the zero-shot evaluation: it runs again only on a start from the base weights
    # what every start writes (the truncation counts) and what a finished stretch wrote at its end (test,
    # test at best dev): the resumed run writes them again for the run as it now stands
    return False


def truncate(path: Path, step: int) -> int:
    """Cut a run's metrics.jsonl back to its checkpoint of step ``step`` (a resume; see _survives_resume),
    rewritten atomically when anything goes; a missing file is left missing. Returns the records dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    recs, torn = read_metrics(path)
    keep = [r for r in recs if _survives_resume(r, step)]
    dropped = len(recs) - len(keep) + torn
    if dropped:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return dropped
