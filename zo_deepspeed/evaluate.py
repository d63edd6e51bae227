"""Evaluation of the weights an engine holds on a task split: candidate scoring for classification,
greedy generation for generation tasks. Collective under ZeRO-3: each rank scores a contiguous shard,
and every rank runs the same number of forwards (a short shard pads with a discarded forward)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .distributed import shard_range

__all__ = ["EvalResult", "Evaluator"]


@dataclass(frozen=True)
class EvalResult:
    split: str
    metric: str
    value: float
    n: int


@dataclass
class Evaluator:
    engine: object        # a ZOEngine: its forward, module, device and all_reduce
    task: object          # a tasks.Task
    tokenizer: object
    max_length: int
    batch_size: int = 32

    def generate(self, examples: Sequence) -> list[str]:
        """Greedy continuations with the engine's current (possibly perturbed) weights. Collective."""
        from .tasks import generate_answers

        eng = self.engine
        return generate_answers(eng.module, self.tokenizer, examples, self.max_length, device=eng.device,
                                synced=eng.world_size > 1)

    @torch.no_grad()
    def evaluate(self, split: str, examples: Sequence) -> EvalResult:
        """The task metric over ``examples`` at theta (the pending update is applied first)."""
        from .tasks import score_candidates

        eng = self.engine
        eng.flush()
        mine = list(shard_range(len(examples), eng.rank, eng.world_size))
        longest = len(shard_range(len(examples), 0, eng.world_size))  # rank 0's shard is never shorter
        bs = self.batch_size
        preds: list = []
        for b in range(-(-longest // bs)):
            idx = mine[b * bs:(b + 1) * bs]
            chunk = [examples[i] for i in idx] or [examples[0]]  # padding forward: result discarded
            if self.task.kind == "classification":
                p, _ = score_candidates(eng.forward, self.tokenizer, chunk, self.max_length, batch_size=len(chunk))
            else:
                p = self.generate(chunk)
            preds += p[:len(idx)]
        local = self.task.score([examples[i] for i in mine], preds)[self.task.metric] * len(mine) if mine else 0.0
        tot = eng.all_reduce(torch.tensor([local, float(len(mine))], dtype=torch.float64))
        value = float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")
        return EvalResult(split, self.task.metric, value, int(tot[1]))
