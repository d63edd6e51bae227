"""What a step does with its projected gradients: learning-rate schedules and update rules.

Everything here works on scalars. A step's update is ``theta <- (1 - decay) *
theta + sum_k c_k z_k``, a short list of (seed, coefficient) streams, and the
rules below only choose the coefficients:

* ``sgd``      (MeZO): ``c = -lr_t * g / q`` for each of the step's q seeds.
* ``sign``     (ZO-SGD-Sign): ``c = -lr_t * sign(g) / q``; the step length no
  longer depends on the scale of the loss difference.
* ``momentum`` (heavy ball on the projected gradient, truncated): the update
  of step t is ``-lr_t * sum_{i<H} beta^i * (1/q) sum_j g_{t-i,j} z_{t-i,j}``.
  No parameter-sized buffer: the momentum is kept as the scalar history of
  the last H steps' (seed, g) and its z are regenerated, so a pass costs
  about H + 1 stream evaluations instead of 2 (H = ``zo.momentum_window``).
  Dropping terms older than H changes the total weight of each g*z from
  1/(1-beta) to (1-beta^H)/(1-beta): with beta = 0.9 and H = 8, 57% of it.

The trajectory log records each step's final (seed, coefficient) list, so
``replay`` applies any rule without knowing it.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterable, Literal, Sequence

from .typed import choices

__all__ = ["LRSchedule", "Optimizer", "LR_SCHEDULES", "OPTIMIZERS", "lr_at", "UpdateRule"]

LRSchedule = Literal["constant", "linear", "cosine"]  # zo.lr_schedule
Optimizer = Literal["sgd", "sign", "momentum"]        # zo.optimizer
LR_SCHEDULES = choices(LRSchedule)
OPTIMIZERS = choices(Optimizer)


def lr_at(lr: float, schedule: str, step: int, warmup_steps: int = 0, total_steps: int = 0) -> float:
    """Learning rate of step ``step`` (0-based).

    Warm-up: linear from lr/warmup to lr over the first ``warmup_steps`` steps.
    Then ``constant``; ``linear`` decay to 0 at ``total_steps``; or ``cosine``
    decay to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = max(1, total_steps - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return lr * (1.0 - frac)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}; use one of {LR_SCHEDULES}")


class UpdateRule:
    """Turns (seeds, g, lr_t) of each step into the update's (seed, coefficient) terms."""

    def __init__(self, optimizer: str = "sgd", momentum: float = 0.9, window: int = 8):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; use one of {OPTIMIZERS}")
        self.optimizer = optimizer
        self.beta = momentum
        # (seeds, g) of the last `window` steps, newest last; skipped steps enter with g = 0
        # so the history stays aligned with time.
        self.history: deque[tuple[tuple[int, ...], tuple[float, ...]]] = deque(maxlen=window)

    def terms(self, seeds: Sequence[int], g: Sequence[float], lr: float) -> tuple[tuple[int, float], ...]:
        q = len(seeds)
        if self.optimizer == "sgd":
            return tuple((s, -lr * x / q) for s, x in zip(seeds, g) if x != 0.0)
        if self.optimizer == "sign":
            return tuple((s, -lr * math.copysign(1.0, x) / q) for s, x in zip(seeds, g) if x != 0.0)
        self.history.append((tuple(seeds), tuple(g)))
        out: dict[int, float] = {}
        for age, (ss, gs) in enumerate(reversed(self.history)):
            w = self.beta ** age
            for s, x in zip(ss, gs):
                if x != 0.0:
                    out[s] = out.get(s, 0.0) - lr * w * x / len(ss)
        return tuple(out.items())

    def skip(self, seeds: Sequence[int]) -> None:
        """A skipped step: no update now, and a zero entry in the momentum history."""
        if self.optimizer == "momentum":
            self.history.append((tuple(seeds), (0.0,) * len(seeds)))

    def rebuild(self, records: Iterable) -> None:
        """Take up the momentum history of a run from its last trajectory records (replay)."""
        self.history.clear()
        if self.optimizer != "momentum":
            return  # sgd and sign keep no history
        for r in records:
            self.history.append((tuple(r.seeds), tuple(r.g)))

    def state_dict(self) -> dict:
        return {"history": [[list(s), list(g)] for s, g in self.history]}

    def load_state_dict(self, sd: dict) -> None:
        self.history.clear()
        for s, g in sd["history"]:
            self.history.append((tuple(int(x) for x in s), tuple(float(x) for x in g)))
