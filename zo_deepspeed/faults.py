"""Fault injection for the crash tests (tests/test_faults.py). Inert unless ``ZO_DEEPSPEED_FAULT`` is set.

``ZO_DEEPSPEED_FAULT="SITE@STEPS[:RANK]"``: when this process reaches SITE at a listed step (on RANK
only, or on every rank), the fault fires. STEPS is a comma list of ``N``, ``A-B`` or ``A-`` (open);
several faults are separated by ``;``.

Crash sites (the process SIGKILLs itself: no ``finally``, no ``atexit``, no flush; a lost node or
the OOM killer looks the same from the disk):

* ``perturbed@t``   during step t, weights at theta + eps z, before the first forward
* ``log_torn@t``    half of step t's trajectory record is on disk (torn last line)
* ``ckpt_files@n``  checkpoint of step n: this rank's file is written, nothing else
* ``ckpt_rename@n`` checkpoint complete in its temp folder, not yet renamed into place
* ``ckpt_latest@n`` checkpoint renamed into place, ``latest`` not yet updated
* ``export@n``      HF export complete in its temp folder, not yet renamed into place

Numerical sites (return True; the caller corrupts a value): ``nan@t`` / ``inf@t`` make this
rank's loss at step t NaN / inf.
"""
from __future__ import annotations

import os
import signal

__all__ = ["hit", "crash_point", "kill"]

ENV = "ZO_DEEPSPEED_FAULT"


def _rank() -> int:
    import torch

    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def hit(site: str, step: int) -> bool:
    """Whether ``ZO_DEEPSPEED_FAULT`` names ``site`` at ``step`` on this rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return False  # the normal case: one dict lookup
    for one in spec.split(";"):
        where, _, rank = one.partition(":")
        name, _, steps = where.partition("@")
        if name != site or (rank and int(rank) != _rank()):
            continue
        for part in steps.split(","):
            lo, dash, hi = part.partition("-")
            if (not dash and step == int(lo)) or (dash and int(lo) <= step and (not hi or step <= int(hi))):
                return True
    return False


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(site: str, step: int) -> None:
    """SIGKILL this process here if ``ZO_DEEPSPEED_FAULT`` names this site and step."""
    if hit(site, step):
        kill()
