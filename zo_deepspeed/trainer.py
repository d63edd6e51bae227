"""The trainer: the loop over ZO steps, with evaluation, metrics, checkpoints and export around it.

``Trainer.train`` is the whole loop and hands off to :meth:`Trainer.train_step` (one engine step on
this rank's share of the batch), the :class:`Evaluator`, and the checkpointer
(:mod:`zo_deepspeed.checkpoint`). Run setup (process group, data, tokenizer, ds_config) is
:mod:`zo_deepspeed.build`; the objectives are :mod:`zo_deepspeed.tasks.objectives`. Everything that
runs a forward is collective under ZeRO-3, so every rank executes the same forwards in the same order.
"""
from __future__ import annotations

import json
import random
import signal
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .build import RunLock, build_engine, check_writable, prepare_run
from .distributed import shard, shard_range
from .evaluate import EvalResult, Evaluator
from .fsutil import atomic_write_text
from .monitor import MetricsLog
from .run_config import RunConfig
from .tasks.objectives import Objective
from .trajectory import model_fingerprint, truncate

__all__ = ["Trainer", "EXIT_PREEMPTED", "batch_indices"]

# Exit status after a SIGTERM-triggered checkpoint: launch/slurm.sbatch requeues on it.
EXIT_PREEMPTED = 75


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Indices into the n training examples of step ``step``'s global batch: a pure function of (seed, step),
    so a resumed run, and any reference trained outside the trainer, sees the same batches."""
    rng = random.Random(f"{seed}/batch/{step}")
    return rng.sample(range(n), batch_size) if batch_size <= n else [rng.randrange(n) for _ in range(batch_size)]


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        from . import distributed

        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        rank, _ = distributed.setup()
        self.is_main = rank == 0
        # Every check up to the lock only reads: a refused run writes nothing (no run dir, no checkpoint).
        if self.is_main:
            if not resume and (self.run_dir / "trajectory.jsonl").exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                      "or choose another train.output_dir")
            check_writable(self.run_dir)
        if cfg.train.steps > 0 and cfg.zo.lr == 0:
            raise ValueError("zo.lr=0 with train.steps > 0 would change no weight; set zo.lr > 0 (MeZO: 1e-6 or "
                             "1e-7), or train.steps=0 to only evaluate")
        self.setup = s = prepare_run(cfg, self.run_dir)
        self.cfg = cfg = s.cfg  # resolved
        if not s.splits["train"] and cfg.train.steps > 0:
            raise ValueError(f"task {cfg.data.task} has no training examples")
        # generation (the f1 objective) drives the engine's module: bound late, once the engine exists
        self.objective = Objective(cfg.train.objective, s.task, s.tokenizer, cfg.data.max_length,
                                   generate=lambda exs: self.evaluator.generate(exs))
        if self.is_main:
            self._lock = RunLock(self.run_dir)  # the first write; DeepSpeed's monitors write next
        self.engine = build_engine(s, self.objective)
        self.evaluator = Evaluator(self.engine, s.task, s.tokenizer, cfg.data.max_length, cfg.train.eval_batch_size)
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if resume:
            self._resume()
        self.metrics = None
        if self.is_main:
            atomic_write_text(self.run_dir / "config.json", json.dumps(
                {**cfg.to_dict(), "resolved_ds_config": s.ds_config, "world_size": s.world}, indent=1))
            self.metrics = MetricsLog(self.run_dir, getattr(self.engine.ds_engine, "monitor", None),
                                      cfg.train.steps, self.engine.step_count)
        self.engine.open_log(self.run_dir / "trajectory.jsonl", model=cfg.model.path, task=cfg.data.task,
                             base_fingerprint=model_fingerprint(s.model_path))

    # -- loop --------------------------------------------------------------------------
    def train(self) -> dict[str, EvalResult]:
        t = self.cfg.train
        summary: dict[str, EvalResult] = {}
        if t.zero_shot_eval and self.engine.step_count == 0:
            summary["zero_shot"] = self.evaluate("test")
        while self.engine.step_count < t.steps:
            res = self.train_step()
            step = res.step + 1
            if self.metrics is not None:
                self.metrics.step(res)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                self.evaluate("dev")
            if t.save_every and step % t.save_every == 0:
                self.save()
            if self._preempted():
                self.save()
                self._print(f"SIGTERM: checkpoint at step {step} written; exiting {EXIT_PREEMPTED} for requeue")
                sys.exit(EXIT_PREEMPTED)
        if self.metrics is not None:
            self.metrics.close()
        self.save()
        summary["final"] = self.evaluate("test")
        if t.export:
            ckpt.export_hf(self.engine, self.run_dir / "export", self.setup.tokenizer)
        return summary

    def train_step(self):
        """One ZO step on this rank's share of the step's global batch, in ``grad_accum`` micro-batches."""
        t, train = self.cfg.train, self.setup.splits["train"]
        ids = batch_indices(self.cfg.zo.seed, self.engine.step_count, len(train), t.batch_size)
        mine = [train[i] for i in shard(ids, *self.engine.data_shard)]  # this rank's data group's share
        micro = [self.objective.batch([mine[i] for i in shard_range(len(mine), k, t.grad_accum)])
                 for k in range(t.grad_accum)]
        return self.engine.step(micro, example_ids=[train[i].id for i in ids])

    def evaluate(self, split: str) -> EvalResult:
        """Collective. The task metric on ``split`` at the current weights, printed and logged."""
        res = self.evaluator.evaluate(split, self.setup.splits[split])
        step = self.engine.step_count
        self._print(f"{split} {res.metric}: {res.value:.4f} on {res.n} examples (step {step})")
        if self.metrics is not None:
            self.metrics.write({"step": step, f"{split}/{res.metric}": res.value})
        return res

    # -- state -----------------------------------------------------------------------------
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.engine, self.run_dir, extra={"seed": self.cfg.zo.seed},
                                    keep=self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        info = ckpt.resume(self.engine, self.run_dir)
        if info.how == "base":
            self._print("resume: no checkpoint yet; starting from the base weights")
        elif info.how == "replay":
            self._print(f"resume: {info.path.name} was written at another world size or layout; replayed "
                        f"{info.step} logged steps instead")
        else:
            self._print(f"resume: loaded {info.path.name} (step {info.step})")
        # log records past the checkpoint ran after it and will run again
        log = self.run_dir / "trajectory.jsonl"
        if self.is_main and log.exists():
            truncate(log, info.step)
        from .distributed import barrier

        barrier()

    # -- plumbing ----------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True  # acted on between steps, on every rank at the same step

    def _preempted(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], dtype=torch.float64)
        return bool(self.engine.all_reduce(flag)[0] > 0)

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(f"[zo_deepspeed] {msg}", flush=True)
