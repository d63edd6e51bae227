"""A run's metrics: one JSON line per event in ``metrics.jsonl``, mirrored into DeepSpeed's monitors
(CSV, TensorBoard) under ``zo/<name>``, and the console progress bar. Rank 0 only."""
from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["MetricsLog"]


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
