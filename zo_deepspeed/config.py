"""Typed ZO settings (the ``zo`` section of the run config). Field docstrings are the CLI help
(``zo-deepspeed train --help``); ``Literal`` field types are the choices (see :mod:`zo_deepspeed.typed`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from .estimators import Estimator
from .rng import Distribution
from .typed import check_fields, choices, section_values
from .variants import LRSchedule, Optimizer

__all__ = ["ZOConfig", "Restore", "BaseDevice", "Perturb", "RESTORE_MODES", "BASE_DEVICES", "PARTITION_ONLY_RESTORE"]

Restore = Literal["auto", "inplace", "master", "backup", "none"]
BaseDevice = Literal["same", "cpu"]
Perturb = Literal["auto", "forward", "partition"]
# restore modes that only mean something when the partition itself is perturbed
PARTITION_ONLY_RESTORE = ("inplace", "backup")
RESTORE_MODES = choices(Restore)
BASE_DEVICES = choices(BaseDevice)


@dataclass(frozen=True)
class ZOConfig:
    RENAMED: ClassVar[dict[str, str]] = {"dist": "distribution"}  # old key -> new key (still read, with a warning)

    lr: float = 1e-6
    """Learning rate of the ZO-SGD update theta <- theta - lr*(g*z + wd*theta). MeZO full-parameter: 1e-6 or 1e-7."""
    eps: float = 1e-3
    """Perturbation scale epsilon of the two-sided estimate g = (L(theta+eps z) - L(theta-eps z)) / (2 eps)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to parameters with 2 or more dimensions only (decided by shape)."""
    q: int = 1
    """Perturbations per step; the update averages their g*z. spsa: q two-sided pairs (K = 2q models per step);
    fzoo: N = q one-sided perturbations plus the clean model (K = q + 1; q >= 2)."""
    estimator: Estimator = "spsa"
    """How a step's losses become projected gradients (zo_deepspeed/estimators.py). spsa: MeZO's two-sided
    g = (L+ - L-)/(2 eps) per perturbation. fzoo: FZOO (ICLR 2026): one clean and q one-sided perturbations,
    g_i = (L_i - L_0)/sigma with sigma the standard deviation of the q perturbed losses (the paper uses
    zo.distribution=rademacher)."""
    perturb_parallel: int = 1
    """Perturbation parallelism: ranks per data group, each evaluating its share (q / this) of the step's
    perturbations on the same data shard; the world splits into world / this data groups. Needs
    zo.perturb=forward; 1: every rank evaluates every perturbation on its own shard."""
    seed: int = 0
    """Run seed; step t's j-th perturbation uses a seed derived from (seed, t, j)."""
    distribution: Distribution = "gaussian"
    """Distribution of z: gaussian (MeZO) or rademacher (+-1). Formerly zo.dist (still read, with a warning)."""
    perturb: Perturb = "auto"
    """Where a step evaluates theta +- eps z. forward: on the weights each forward reads (K perturbed copies of the
    batch in one forward, one gather per step; the partition is never perturbed and only receives the update).
    partition: edits every rank's partition in place (+eps z, -2 eps z, restore; two forwards per perturbation).
    auto: forward for language models (HF/peft: the rows of a batch are computed independently), except with
    zo.restore=inplace or backup (partition-only modes) or train.objective=f1 (generate() decodes one model at a
    time); partition otherwise."""
    restore: Restore = "auto"
    """How the weights are held. none (zo.perturb=forward only): the partition is never perturbed and holds theta;
    updates land in place, stochastically rounded in bf16. inplace (partition mode): x += c*z (exact up to rounding;
    lossy in 16 bit). master: float32 copy of the local partition (4 B/param/rank), exact, updates accumulate in
    float32. backup (partition mode): 16-bit copy of the local partition (2 B/param/rank), exact restore,
    stochastically rounded update. auto: perturb=forward: none (master for float16); partition: inplace for float32
    partitions, master for 16-bit ones."""
    base_device: BaseDevice = "same"
    """Where master/backup copies live: same (next to the partition) or cpu."""
    fuse_update: bool = True
    """Apply step t's update inside step t+1's first pass: 2 passes over the partition per step instead of 3."""
    compile: bool = True
    """Use the torch.compile'd fused kernel (falls back to the eager one with the same integer stream when False)."""
    max_abs_g: float = 0.0
    """Clip |g| to this value (0: no clipping)."""
    max_consecutive_skips: int = 10
    """Stop with an error after this many steps in a row had a non-finite loss and were skipped (0: never)."""
    optimizer: Optimizer = "sgd"
    """Update rule on the projected gradient: sgd (MeZO), sign (ZO-SGD-Sign: lr*sign(g)*z), or momentum
    (heavy ball over a scalar history of the last momentum_window steps; no parameter-sized state)."""
    momentum: float = 0.9
    """Momentum coefficient beta (optimizer=momentum)."""
    momentum_window: int = 8
    """Steps of (seed, g) history the momentum keeps; each pass then evaluates about window+1 z streams."""
    lr_schedule: LRSchedule = "constant"
    """Learning-rate schedule after warm-up: constant, linear (to 0 at total_steps) or cosine (to 0 at total_steps)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    total_steps: int = 0
    """Length of the linear/cosine schedule; 0: train.steps (filled in by run_config.resolve_run_config)."""
    sparse_keep: float = 1.0
    """Sparse-MeZO: fraction of each parameter's entries that are perturbed and updated, those of smallest |theta|
    (threshold computed exactly across ranks from the starting weights). 1.0: dense MeZO. The mask is read from an
    exact theta: perturb=forward (the partition is theta), or restore=master or backup in partition mode. Weight
    decay still applies to every entry."""

    def __post_init__(self) -> None:
        check_fields(self, "zo")  # types and Literal choices; the ranges below
        for name in ("lr", "eps", "weight_decay", "max_abs_g"):
            v = getattr(self, name)
            if not math.isfinite(v):
                raise ValueError(f"zo.{name} must be a finite number, got {v!r}")
        if self.eps <= 0:
            raise ValueError(f"zo.eps must be > 0 (MeZO uses 1e-3), got {self.eps}")
        if self.lr < 0:
            raise ValueError(f"zo.lr must be >= 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"zo.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_abs_g < 0:
            raise ValueError(f"zo.max_abs_g must be >= 0 (0 disables clipping), got {self.max_abs_g}")
        if self.q < 1:
            raise ValueError(f"zo.q must be an integer >= 1, got {self.q!r}")
        if self.max_consecutive_skips < 0:
            raise ValueError(f"zo.max_consecutive_skips must be an integer >= 0 (0: never stop), "
                             f"got {self.max_consecutive_skips!r}")
        if self.seed < 0:
            raise ValueError(f"zo.seed must be a non-negative integer, got {self.seed!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"zo.momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum_window < 1:
            raise ValueError(f"zo.momentum_window must be an integer >= 1, got {self.momentum_window!r}")
        for name in ("warmup_steps", "total_steps"):
            v = getattr(self, name)
            if v < 0:
                raise ValueError(f"zo.{name} must be an integer >= 0, got {v!r}")
        if not 0.0 < self.sparse_keep <= 1.0:
            raise ValueError(f"zo.sparse_keep must be in (0, 1] (1: dense), got {self.sparse_keep!r}")
        if self.estimator == "fzoo" and self.q < 2:
            raise ValueError(f"zo.estimator=fzoo normalises by the spread of q one-sided losses: set zo.q >= 2 (FZOO "
                             f"uses 8 or more), got {self.q}")
        if self.perturb_parallel < 1 or self.q % self.perturb_parallel:
            raise ValueError(f"zo.perturb_parallel={self.perturb_parallel} must divide zo.q={self.q}: each rank of a "
                             "data group evaluates q / perturb_parallel perturbations")
        if self.perturb_parallel > 1 and self.resolved_perturb() == "partition":
            raise ValueError("zo.perturb_parallel > 1 evaluates different perturbations on different ranks, which "
                             "partition mode cannot (the ranks would gather a mix of them); set zo.perturb=forward")
        if self.perturb == "forward" and self.restore in PARTITION_ONLY_RESTORE:
            raise ValueError(f"zo.restore={self.restore} restores a perturbed partition, and zo.perturb=forward never "
                             "perturbs it; use zo.restore=none (default) or master, or zo.perturb=partition")
        if self.perturb == "partition" and self.restore == "none":
            raise ValueError("zo.restore=none keeps the partition unperturbed, which only zo.perturb=forward does; "
                             "use zo.restore=inplace/master/backup with zo.perturb=partition, or zo.perturb=forward")

    def resolved_perturb(self, generates: bool = False, rowwise: bool = True) -> str:
        """``perturb`` with auto decided: partition for a partition-only restore mode, when a step's losses
        come from generate() (``generates``), or for a model whose batch rows are not known to be computed
        independently (``rowwise`` False: stacking K perturbed copies of the batch needs that); forward
        otherwise."""
        if self.perturb != "auto":
            return self.perturb
        partition = generates or not rowwise or self.restore in PARTITION_ONLY_RESTORE
        return "partition" if partition else "forward"

    @classmethod
    def from_dict(cls, d: dict) -> "ZOConfig":
        """From a trajectory log header's ``zo`` (any zo_deepspeed version: an old header's ``dist`` is read
        as ``distribution``, silently)."""
        return cls(**section_values(cls, d, "zo", "file", where=" of the log header", warn=False))
