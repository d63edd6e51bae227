"""What g estimates: the training objectives of ``train.objective``, as loss functions of the ZO engine.

A loss function takes the (perturbed) model's forward and one micro-batch and returns a (sum, count)
pair, not a mean: the all-reduced pair is then the exact global mean whatever the sharding. The ZO
estimate needs only the two scalars of a step, so an objective may be non-differentiable (accuracy,
F1 of generations).

* ``loss``: LM cross-entropy on the gold option/answer tokens (:func:`zo_deepspeed.causal_lm_loss`).
* ``choice``: cross-entropy of the gold option among the candidates, from their mean token NLLs:
  pushes the right option above the wrong ones (what accuracy measures) rather than raising every
  option's likelihood.
* ``accuracy``: minus the accuracy of candidate scoring.
* ``f1``: minus the mean SQuAD F1 of greedy generations (each forward of the pair is a ``generate``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..engine import causal_lm_loss
from ..run_config import Objective as _ObjectiveName
from ..typed import choices
from .base import Example, Task
from .encoding import encode_for_training, score_candidates

__all__ = ["Objective", "OBJECTIVES"]

OBJECTIVES = tuple(c for c in choices(_ObjectiveName) if c != "auto")  # auto is resolved before a run starts


def _pair(total: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(total, dtype=torch.float64), torch.tensor(float(n), dtype=torch.float64)


@dataclass(frozen=True)
class Objective:
    """``name``'s batches (:meth:`batch`) and loss function (the object itself).

    ``generate(examples) -> texts`` decodes with the model the engine holds (``f1`` only): the
    perturbed weights are what it reads, and under ZeRO-3 it must run on every rank.
    """

    name: str
    task: Task
    tokenizer: object
    max_length: int
    generate: Callable[[Sequence[Example]], list[str]] | None = None

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"train.objective={self.name!r}; use one of {', '.join(OBJECTIVES)}")
        if self.name in ("accuracy", "choice") and self.task.kind != "classification":
            raise ValueError(f"train.objective={self.name} scores candidates: classification tasks only; "
                             "use train.objective=loss or f1 for generation tasks")
        if self.name == "f1" and self.task.kind != "generation":
            raise ValueError(f"train.objective=f1 scores generations: generation tasks only; use "
                             f"train.objective=accuracy or choice for {self.task.name}")

    def batch(self, examples: Sequence[Example]) -> dict:
        """One micro-batch: token tensors for ``loss``, the examples themselves otherwise."""
        if self.name == "loss":
            return encode_for_training(self.tokenizer, examples, self.max_length)
        return {"examples": list(examples)}

    def __call__(self, forward: Callable, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "loss":
            return causal_lm_loss(forward, batch)
        exs = batch["examples"]
        if self.name == "f1":
            # ``forward`` is unused: generate() drives the (perturbed) module itself, synced across ranks
            preds = self.generate(exs)  # final answers (MeZO's decoding rule): scored as they are
            return _pair(-sum(self.task.score([ex], [p], raw=False)["f1"] for ex, p in zip(exs, preds)), len(exs))
        preds, losses = score_candidates(forward, self.tokenizer, exs, self.max_length, batch_size=len(exs))
        if self.name == "accuracy":
            return _pair(-float(sum(int(p == ex.label) for p, ex in zip(preds, exs))), len(exs))
        # choice: no autograd is needed, so the scorer's Python floats are fine
        total = 0.0
        for ex, nll in zip(exs, losses):
            logits = -torch.tensor(nll, dtype=torch.float64)
            total += float(-torch.log_softmax(logits, 0)[ex.label])
        return _pair(total, len(exs))
