"""What a step evaluates (its blocks) and how the blocks' losses become projected gradients.

A step's K blocks are models ``theta + sum c z``: with ``zo.perturb=forward`` one forward evaluates all K
on a stacked batch (:mod:`zo_deepspeed.perturb`), in partition mode they are shown one after the other.
Either way the result is K mean losses, and the estimators below turn them into one projected gradient
``g_j`` per seed; the update rule (:mod:`zo_deepspeed.variants`) turns those into the step's
(seed, coefficient) streams, which the trajectory log records, so replay never needs the estimator.

* ``spsa`` (MeZO; q-SPSA for ``q > 1``): blocks ``theta + eps z_j`` (j < q) then ``theta - eps z_j``;
  ``g_j = (L+_j - L-_j) / (2 eps)``; the sgd rule averages the q estimates (``c_j = -lr g_j / q``).
  K = 2q. Unbiased for E[z z^T grad] = grad as eps -> 0.
* ``fzoo`` (FZOO, Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language Models
  towards Adam-Scale Speed", ICLR 2026): one clean block ``theta`` and N = q one-sided blocks
  ``theta + eps u_i``; ``sigma`` is the standard deviation of ``L_1 .. L_N`` (population, 1/N, as the
  authors' code computes it) and ``g_i = (L_i - L_0) / sigma``; with the sgd rule
  ``c_i = -lr g_i / N``, i.e. ``theta <- theta - lr sum_i (L_i - L_0) / (N sigma) u_i``, the paper's
  step: its length no longer scales with the loss's, it is normalised by the spread of the N losses.
  The paper draws u from Rademacher (``zo.distribution=rademacher``); Gaussian works too. K = N + 1.
  All N losses equal (sigma = 0): g = 0, no update.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

from .perturb import Block

__all__ = ["Estimator", "ESTIMATORS", "blocks", "local_blocks", "n_blocks", "projected_gradients", "step_loss"]

Estimator = Literal["spsa", "fzoo"]
ESTIMATORS = ("spsa", "fzoo")


def n_blocks(estimator: str, q: int) -> int:
    """K: the models one step evaluates."""
    return 2 * q if estimator == "spsa" else q + 1


def blocks(estimator: str, seeds: Sequence[int], eps: float) -> list[Block]:
    """The step's blocks, in the order of their losses."""
    if estimator == "spsa":
        return [Block(((s, sign * eps),)) for sign in (1.0, -1.0) for s in seeds]
    return [Block(())] + [Block(((s, eps),)) for s in seeds]


def local_blocks(estimator: str, seeds: Sequence[int], eps: float, mine: Sequence[int]
                 ) -> tuple[list[Block], list[int]]:
    """The blocks of the seeds with indices ``mine`` (perturbation parallelism: this rank's share of the
    step's seeds) and their indices among all the step's blocks. fzoo: every share has the clean block."""
    every = blocks(estimator, seeds, eps)
    q = len(seeds)
    if estimator == "spsa":
        idx = [j for j in mine] + [q + j for j in mine]
    else:
        idx = [0] + [1 + j for j in mine]
    return [every[k] for k in idx], idx


def projected_gradients(estimator: str, losses: Sequence[float], eps: float) -> list[float]:
    """One g per seed from the K block losses (a non-finite loss gives non-finite g: the step is skipped)."""
    if estimator == "spsa":
        q = len(losses) // 2
        return [(losses[j] - losses[q + j]) / (2 * eps) for j in range(q)]
    clean, perturbed = losses[0], list(losses[1:])
    mean = sum(perturbed) / len(perturbed)
    sigma = math.sqrt(sum((x - mean) ** 2 for x in perturbed) / len(perturbed))
    if not math.isfinite(sigma) or not math.isfinite(clean):
        return [math.nan] * len(perturbed)
    if sigma == 0.0:
        return [0.0] * len(perturbed)
    return [(x - clean) / sigma for x in perturbed]


def step_loss(estimator: str, losses: Sequence[float]) -> float:
    """The loss a step reports: the mean of the first +- pair (spsa), the clean loss (fzoo)."""
    if estimator == "spsa":
        q = len(losses) // 2
        return 0.5 * (losses[0] + losses[q])
    return losses[0]
