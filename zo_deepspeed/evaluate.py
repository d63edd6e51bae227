"""Evaluation of the weights an engine holds on a task split: candidate scoring for classification (optionally
calibrated), greedy generation for generation tasks, and the training objective's mean (the dev loss MeZO selects
checkpoints by). Collective under ZeRO-3: each rank scores a contiguous shard, and every rank runs the same number
of forwards (a short shard pads with a discarded forward).

:func:`run_eval` is ``zo-deepspeed eval``: zero-shot, in-context learning with k demonstrations, and calibration
(:mod:`zo_deepspeed.tasks.icl`), i.e. the zero-shot and ICL rows of MeZO's Table 1 from the same code."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .distributed import shard_range
from .fsutil import atomic_write_text

__all__ = ["EvalResult", "Evaluator", "run_eval"]


@dataclass(frozen=True)
class EvalResult:
    split: str
    metric: str
    value: float
    n: int
    step: int | None = None  # the step of the weights evaluated (the trainer sets it)


@dataclass
class Evaluator:
    engine: object        # a ZOEngine: its forward, module, device and all_reduce
    task: object          # a tasks.Task
    tokenizer: object
    max_length: int
    batch_size: int = 32
    max_new_tokens: int = 50  # generation: MeZO's 50 (run.py:81)
    first_line: bool = True   # generation: score the answer's first line (data.answer_first_line)

    def generate(self, examples: Sequence) -> list[str]:
        """Greedy answers with the engine's current (possibly perturbed) weights, decoded by MeZO's rule (stop at
        the newline token or EOS, strip), cut at their first newline unless ``first_line`` is off. Collective."""
        from .tasks import generate_answers

        eng = self.engine
        answers = generate_answers(eng.module, self.tokenizer, examples, self.max_length, device=eng.device,
                                   synced=eng.world_size > 1, max_new_tokens=self.max_new_tokens)
        return [self.task.postprocess(a) for a in answers] if self.first_line else answers

    def _shards(self, n: int):
        """(indices of this rank's chunk, padded) per chunk; every rank gets the same number of chunks."""
        eng = self.engine
        mine = list(shard_range(n, eng.rank, eng.world_size))
        longest = len(shard_range(n, 0, eng.world_size))  # rank 0's shard is never shorter
        bs = self.batch_size
        return mine, [mine[b * bs:(b + 1) * bs] for b in range(-(-longest // bs))]

    @torch.no_grad()
    def evaluate(self, split: str, examples: Sequence, calibration: Sequence | None = None) -> EvalResult:
        """The task metric over ``examples`` at theta (the pending update is applied first).

        ``calibration``: per example, the same example with its calibration prompt (tasks.icl.calibration_examples):
        each candidate then scores the sum of its option-token log-likelihoods minus that given the calibration
        prompt (MeZO's --sfc / --icl_sfc); otherwise the mean log-likelihood (MeZO's default)."""
        from .tasks import score_candidates

        eng = self.engine
        eng.flush()
        generation = self.task.kind != "classification"
        if calibration is not None and generation:
            raise ValueError(f"{self.task.name}: calibration scores candidates; generation tasks have none")
        mine, chunks = self._shards(len(examples))
        preds: list = []
        for idx in chunks:
            chunk = [examples[i] for i in idx] or [examples[0]]  # padding forward: result discarded
            if generation:
                p = self.generate(chunk)
            else:
                p, losses = score_candidates(eng.forward, self.tokenizer, chunk, self.max_length, batch_size=len(chunk))
                if calibration is not None:
                    cal = [calibration[i] for i in idx] or [calibration[0]]
                    _, cal_losses = score_candidates(eng.forward, self.tokenizer, cal, self.max_length,
                                                     batch_size=len(cal))
                    p = self._calibrated(chunk, losses, cal_losses)
            preds += p[:len(idx)]
        # generation answers are final already (generate: MeZO's decoding rule, and the first line if asked)
        kw = {"raw": False} if generation else {}
        local = self.task.score([examples[i] for i in mine], preds, **kw)[self.task.metric] * len(mine) if mine else 0.0
        tot = eng.all_reduce(torch.tensor([local, float(len(mine))], dtype=torch.float64))
        value = float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")
        return EvalResult(split, self.task.metric, value, int(tot[1]))

    def _calibrated(self, examples, losses, cal_losses) -> list[int]:
        """argmax_j of n_j * (mean NLL given the calibration prompt - mean NLL given the prompt), n_j the option's
        tokens: log p(option | prompt) - log p(option | calibration prompt), summed over the option's tokens
        (MeZO run.py one_step_pred); ties: the lower index, as numpy's argmax."""
        from .tasks.encoding import _tokenize

        out = []
        for ex, full, cal in zip(examples, losses, cal_losses):
            n = [len(ids) for ids in _tokenize(self.tokenizer, ex.candidates)]
            scores = [k * (c - f) for k, f, c in zip(n, full, cal)]
            out.append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
        return out

    @torch.no_grad()
    def loss(self, examples: Sequence, objective) -> float:
        """Collective. The training objective's global mean over ``examples`` at theta: the dev loss MeZO picks
        its checkpoint by (HF's eval_loss on the dev set, mezo.sh:61-62)."""
        eng = self.engine
        eng.flush()
        _, chunks = self._shards(len(examples))
        total = torch.zeros(2, dtype=torch.float64)
        for idx in chunks:
            chunk = [examples[i] for i in idx] or [examples[0]]  # padding forward: result discarded
            s, c = objective(eng.forward, eng.to_device(objective.batch(chunk)))
            if idx:
                total += torch.stack([torch.as_tensor(s).double().cpu(), torch.as_tensor(c).double().cpu()])
        tot = eng.all_reduce(total)
        return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


def run_eval(cfg, *, demos: int = 0, calibrate: str = "none", out: str | Path | None = None) -> EvalResult:
    """``zo-deepspeed eval``: the task metric on the test split, zero-shot (``demos`` 0) or with ``demos``
    in-context demonstrations per example from the train split (MeZO's ICL: one seeded set per example,
    seed zo.seed), optionally calibrated (``sfc``: MeZO's --sfc, ``icl_sfc``: --icl_sfc). Collective."""
    from .build import build_engine, prepare_run
    from .tasks import calibration_examples, get_task, icl_examples, truncation_report
    from .tasks.icl import CALIBRATIONS
    from .tasks.protocol import encoding_tokenizer

    if demos < 0:
        raise ValueError(f"--demos must be >= 0, got {demos}")
    if calibrate not in CALIBRATIONS:
        raise ValueError(f"--calibrate must be one of {', '.join(CALIBRATIONS)}, got {calibrate!r}")
    # before any model is loaded (Evaluator.evaluate refuses it too, for library callers)
    if calibrate != "none" and get_task(cfg.data.task).kind != "classification":
        raise ValueError(f"--calibrate {calibrate}: calibration scores candidates; {cfg.data.task} is a generation task")
    # eval reads the test split only (the train file too for demonstrations, below): no dev, no train files needed
    s = prepare_run(cfg, splits=("test",))
    cfg, task = s.cfg, s.task
    if not s.splits["test"]:
        raise ValueError(f"task {cfg.data.task} has no test examples (data.num_test={cfg.data.num_test}); set "
                         "data.num_test > 0")
    pool = task.load_split("train", cfg.data.data_dir) if demos else []
    test, shots = icl_examples(task, s.splits["test"], pool, demos, seed=cfg.zo.seed)
    cal = None if calibrate == "none" else calibration_examples(task, s.splits["test"], shots, calibrate)
    tok = encoding_tokenizer(s.tokenizer, s.model_path, cfg.data.bos_token_id, verbose=s.is_main)
    generation = task.kind == "generation"
    reserve = cfg.data.max_new_tokens if generation else 0
    trunc = truncation_report(tok, test, cfg.data.max_length, reserve=reserve)
    eng = build_engine(s)
    res = Evaluator(eng, task, tok, cfg.data.max_length, cfg.train.eval_batch_size, cfg.data.max_new_tokens,
                    cfg.data.answer_first_line).evaluate("test", test, calibration=cal)
    if s.is_main:
        how = f"{demos} demonstrations" if demos else "zero-shot"
        if calibrate != "none":
            how += f", calibration {calibrate}"
        print(f"{res.metric}: {res.value:.4f} on {res.n} examples ({how}; {trunc['truncated']} truncated to "
              f"data.max_length={cfg.data.max_length}" + (f", answer cut from {trunc['answer_cut']}" if generation
                                                           else "") + ")")
        if out is not None:
            rec = {"kind": "eval", "task": task.name, "metric": res.metric, "value": res.value, "n": res.n,
                   "demos": demos, "calibrate": calibrate, "seed": cfg.zo.seed, "model": cfg.model.path,
                   "max_length": cfg.data.max_length, "truncation": trunc}
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(out), json.dumps(rec, indent=1))
    return res
