"""The step profile every run records: where a step's time goes, what it moved and how much memory it
held. A scaling study reads these from metrics.jsonl (and the monitors) of every run, not only from
bench/.

Times are wall clock between accelerator synchronisations at the phase boundaries (one sync per
boundary: without them a GPU timer would measure kernel launches). Gathered bytes come from DeepSpeed's
comms logger (``comms_logger`` in the ds_config; the trainer enables it): per rank, the all-gather
input partitions, as DeepSpeed counts them. Peak memory: on an accelerator, the allocator's peak over
the step; on the CPU, the process's resident high-water mark (the CPU allocator keeps no peak).
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

__all__ = ["StepProfile", "Stopwatch", "peak_memory"]


@dataclass(frozen=True)
class StepProfile:
    forward_s: float               # the step's forwards (perturb on read: the perturbed copies are made in them)
    edit_s: float                  # passes over this rank's partition (perturb, restore, update)
    edited: int                    # elements of this rank's pieces those passes wrote
    gathered_bytes: int | None     # DeepSpeed all-gather bytes of this rank (None: comms logger off / no ZeRO-3)
    peak_bytes: int                # see peak_memory
    peak_kind: str                 # "device" (allocator peak of the step) or "rss" (process high-water mark)

    def metrics(self) -> dict:
        out = {"time/forward_s": self.forward_s, "time/edit_s": self.edit_s, "edit/elements": self.edited,
               f"memory/peak_{self.peak_kind}_gib": self.peak_bytes / 2 ** 30}
        if self.gathered_bytes is not None:
            out["comm/gathered_gib"] = self.gathered_bytes / 2 ** 30
        return out


class Stopwatch:
    """Accumulates the time of named phases, synchronising ``device`` at each boundary."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.totals: dict[str, float] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def phase(self, name: str):
        watch = self

        class _Phase:
            def __enter__(self):
                watch._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                watch._sync()
                watch.totals[name] = watch.totals.get(name, 0.0) + time.perf_counter() - self.t0

        return _Phase()


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind) of peak memory since the last call; resets the accelerator's peak counter."""
    device = torch.device(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(peak), "device"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "rss"
