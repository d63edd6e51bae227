"""Typed ZO settings. Field docstrings double as the CLI help."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .rng import DISTRIBUTIONS
from .variants import LR_SCHEDULES, OPTIMIZERS

__all__ = ["ZOConfig", "RESTORE_MODES"]

RESTORE_MODES = ("auto", "inplace", "master", "backup")


@dataclass
class ZOConfig:
    lr: float = 1e-6
    """Learning rate of the ZO-SGD update theta <- theta - lr*(g*z + wd*theta). MeZO full-parameter: 1e-6 or 1e-7."""
    eps: float = 1e-3
    """Perturbation scale epsilon of the two-sided estimate g = (L(theta+eps z) - L(theta-eps z)) / (2 eps)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to parameters with 2 or more dimensions only (decided by shape)."""
    q: int = 1
    """Perturbations per step (n-SPSA); the update averages their g*z."""
    seed: int = 0
    """Run seed; step t's j-th perturbation uses a seed derived from (seed, t, j)."""
    dist: str = "gaussian"
    """Distribution of z: gaussian (MeZO) or rademacher."""
    restore: str = "auto"
    """How perturbed weights return to theta. inplace: x += c*z (exact up to rounding; lossy in 16 bit).
    master: float32 copy of the local partition (4 B/param/rank), exact restore.
    backup: 16-bit copy of the local partition (2 B/param/rank), exact restore, stochastically rounded update.
    auto: inplace for float32 partitions, master for 16-bit ones."""
    base_device: str = "same"
    """Where master/backup copies live: same (next to the partition) or cpu."""
    fuse_update: bool = True
    """Apply step t's update inside step t+1's first pass: 2 passes over the partition per step instead of 3."""
    compile: bool = True
    """Use the torch.compile'd fused kernel (falls back to the eager one with the same integer stream when False)."""
    max_abs_g: float = 0.0
    """Clip |g| to this value (0: no clipping)."""
    max_consecutive_skips: int = 10
    """Stop with an error after this many steps in a row had a non-finite loss and were skipped (0: never)."""
    optimizer: str = "sgd"
    """Update rule on the projected gradient: sgd (MeZO), sign (ZO-SGD-Sign: lr*sign(g)*z), or momentum
    (heavy ball over a scalar history of the last momentum_window steps; no parameter-sized state)."""
    momentum: float = 0.9
    """Momentum coefficient beta (optimizer=momentum)."""
    momentum_window: int = 8
    """Steps of (seed, g) history the momentum keeps; each pass then evaluates about window+1 z streams."""
    lr_schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant, linear (to 0 at total_steps) or cosine (to 0 at total_steps)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    total_steps: int = 0
    """Length of the linear/cosine schedule; the trainer sets it to train.steps when 0."""
    sparse_keep: float = 1.0
    """Sparse-MeZO: fraction of each parameter's entries that are perturbed and updated, those of smallest |theta|
    (threshold computed exactly across ranks from the starting weights). 1.0: dense MeZO. Needs restore=master or
    backup, where the mask is read from the exact copy of theta. Weight decay still applies to every entry."""

    def __post_init__(self) -> None:
        for name in ("lr", "eps", "weight_decay", "max_abs_g"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"zo.{name} must be a finite number, got {v!r}")
        if self.eps <= 0:
            raise ValueError(f"zo.eps must be > 0 (MeZO uses 1e-3), got {self.eps}")
        if self.lr < 0:
            raise ValueError(f"zo.lr must be >= 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"zo.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_abs_g < 0:
            raise ValueError(f"zo.max_abs_g must be >= 0 (0 disables clipping), got {self.max_abs_g}")
        if not isinstance(self.q, int) or self.q < 1:
            raise ValueError(f"zo.q must be an integer >= 1, got {self.q!r}")
        if not isinstance(self.max_consecutive_skips, int) or self.max_consecutive_skips < 0:
            raise ValueError(f"zo.max_consecutive_skips must be an integer >= 0 (0: never stop), "
                             f"got {self.max_consecutive_skips!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"zo.seed must be a non-negative integer, got {self.seed!r}")
        if self.dist not in DISTRIBUTIONS:
            raise ValueError(f"zo.dist={self.dist!r}; use one of {', '.join(DISTRIBUTIONS)}")
        if self.restore not in RESTORE_MODES:
            raise ValueError(f"zo.restore={self.restore!r}; use one of {', '.join(RESTORE_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"zo.optimizer={self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise ValueError(f"zo.momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.momentum_window, int) or self.momentum_window < 1:
            raise ValueError(f"zo.momentum_window must be an integer >= 1, got {self.momentum_window!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"zo.lr_schedule={self.lr_schedule!r}; use one of {', '.join(LR_SCHEDULES)}")
        for name in ("warmup_steps", "total_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"zo.{name} must be an integer >= 0, got {v!r}")
        if not (isinstance(self.sparse_keep, (int, float)) and 0.0 < self.sparse_keep <= 1.0):
            raise ValueError(f"zo.sparse_keep must be in (0, 1] (1: dense), got {self.sparse_keep!r}")
        if self.base_device not in ("same", "cpu"):
            raise ValueError(f"zo.base_device={self.base_device!r}; use same or cpu")

    @classmethod
    def from_dict(cls, d: dict) -> "ZOConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown zo config key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**d)
