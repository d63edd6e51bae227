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
from .guard import check_run_dir
from .distributed import shard, shard_range
from .evaluate import EvalResult, Evaluator
from .fsutil import atomic_write_text
from .monitor import MetricsLog
from .run_config import RunConfig
from .tasks.objectives import Objective
from .trajectory import model_fingerprint, truncate

__all__ = ["Trainer", "EXIT_PREEMPTED", "EXIT_INTERRUPTED", "batch_indices"]

# Exit status after a SIGTERM-triggered checkpoint: launch/slurm.sbatch requeues on it.
EXIT_PREEMPTED = 75
# Exit status after a SIGINT (Ctrl-C) -triggered checkpoint: 128 + SIGINT, as a shell reports it; no requeue.
EXIT_INTERRUPTED = 130


def _check_splits(cfg: RunConfig, splits: dict) -> None:
    """Splits a run would evaluate or train on empty (a NaN metric, or no step) are refused up front."""
    t, d = cfg.train, cfg.data
    if not splits["train"] and t.steps > 0:
        raise ValueError(f"task {d.task} has no training examples (data.num_train={d.num_train}); set "
                         "data.num_train > 0, or train.steps=0 to only evaluate")
    if not splits["test"]:
        raise ValueError(f"task {d.task} has no test examples (data.num_test={d.num_test}) for the final evaluation; "
                         "set data.num_test > 0")
    if t.eval_every and t.eval_every < t.steps and not splits["dev"]:
        raise ValueError(f"train.eval_every={t.eval_every} evaluates on dev, but task {d.task} has no dev examples "
                         f"(data.num_dev={d.num_dev}); set data.num_dev > 0 or train.eval_every=0")


class RunDirUndo:
    """What a run start created in its run directory, removed again if the start fails (refused resume,
    Ctrl-C while loading, a full disk): only paths that did not exist when it was made, and only once
    ``armed`` (this process holds the run lock, so no other run writes there)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        top = self.run_dir.absolute()
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        self.top = top  # the outermost folder a mkdir(parents=True) would create
        self.before = ({str(p) for p in self.run_dir.rglob("*")} if self.run_dir.exists() else None)
        self.armed = False

    def undo(self) -> None:
        import shutil

        if not self.armed:
            return
        try:
            if self.before is None:  # the run dir and the empty parents made for it (rmdir: never others' files)
                shutil.rmtree(self.run_dir, ignore_errors=True)
                p = self.run_dir.absolute().parent
                while p != self.top.parent and p.exists():
                    p.rmdir()
                    p = p.parent
                return
            new = [p for p in self.run_dir.rglob("*") if str(p) not in self.before]
            for p in sorted(new, key=lambda q: len(q.parts), reverse=True):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        except OSError:
            pass  # best effort: the error that stopped the start is what the user needs to see


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Indices into the n training examples of step ``step``'s global batch: a pure function of (seed, step),
    so a resumed run, and any reference trained outside the trainer, sees the same batches."""
    rng = random.Random(f"{seed}/batch/{step}")
    return rng.sample(range(n), batch_size) if batch_size <= n else [rng.randrange(n) for _ in range(batch_size)]


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False):
        from . import distributed

        self.cfg = cfg
        rank, _ = distributed.setup()
        self.is_main = rank == 0
        # Every check up to the lock only reads: a refused run writes nothing (no run dir, no checkpoint).
        self.run_dir = Path(cfg.train.output_dir)
        check_run_dir(cfg.train.output_dir, resume=resume)
        if self.is_main:
            held = [n for n in ("trajectory.jsonl", "checkpoints/latest") if (self.run_dir / n).exists()]
            if not resume and held:
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                      f"or choose another train.output_dir (it has {held[0]})")
            check_writable(self.run_dir)
        if cfg.train.steps > 0 and cfg.zo.lr == 0:
            raise ValueError("zo.lr=0 with train.steps > 0 would change no weight; set zo.lr > 0 (MeZO: 1e-6 or "
                             "1e-7), or train.steps=0 to only evaluate")
        self.setup = s = prepare_run(cfg, self.run_dir)
        self.cfg = cfg = s.cfg  # resolved
        _check_splits(cfg, s.splits)
        # the log against the checkpoint, the base model and the adapter, before anything is built
        self.plan = ckpt.verify_resume(self.run_dir, base=s.model_path, adapter=cfg.adapter.to_dict()) \
            if resume else None
        # generation (the f1 objective) drives the engine's module: bound late, once the engine exists
        self.objective = Objective(cfg.train.objective, s.task, s.tokenizer, cfg.data.max_length,
                                   generate=lambda exs: self.evaluator.generate(exs))
        self._stop = None  # the signal that asked for a stop (acted on between steps)
        created = RunDirUndo(self.run_dir) if self.is_main else None
        try:
            if self.is_main:
                self._lock = RunLock(self.run_dir)  # the first write; DeepSpeed's monitors write next
                created.armed = True
            self._build(cfg, s, resume)
        except BaseException:
            if created is not None:
                created.undo()  # a refused or interrupted start leaves the run directory as it found it
            raise

    def _build(self, cfg: RunConfig, s, resume: bool) -> None:
        self.engine = build_engine(s, self.objective)
        self.evaluator = Evaluator(self.engine, s.task, s.tokenizer, cfg.data.max_length, cfg.train.eval_batch_size)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
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
                self._exit_on_signal(f"checkpoint at step {step} written")
        if self.metrics is not None:
            self.metrics.close()
        self.save()
        if self._preempted():  # a signal during the last step's evaluation or save: the checkpoint is written
            self._exit_on_signal(f"final checkpoint (step {self.engine.step_count}) written; --resume evaluates "
                                 "and exports")
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
        if res.n == 0:  # never a NaN in metrics.jsonl (_check_splits refuses the runs that would get here)
            self._print(f"{split}: no examples; not evaluated (step {step})")
            return res
        self._print(f"{split} {res.metric}: {res.value:.4f} on {res.n} examples (step {step})")
        if self.metrics is not None:
            self.metrics.write({"step": step, f"{split}/{res.metric}": res.value})
        return res

    # -- state -----------------------------------------------------------------------------
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.engine, self.run_dir, extra={"seed": self.cfg.zo.seed},
                                    keep=self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        plan = self.plan
        info = ckpt.resume(self.engine, self.run_dir)
        rerun = plan.logged - info.step  # logged steps past the checkpoint: they run again
        if info.how == "base":
            if rerun > 0:
                self._print(f"resume: no checkpoint yet; the log's {rerun} step(s) run again from the base weights "
                            "(each step's batch and seeds are a function of (zo.seed, step): the same steps)")
            else:
                self._print("resume: no checkpoint yet and nothing logged; starting from the base weights")
        elif info.how == "replay":
            self._print(f"resume: {info.path.name} was written at another world size or layout; replayed "
                        f"{info.step} logged steps instead")
        else:
            self._print(f"resume: loaded {info.path.name} (step {info.step})")
        # log records past the checkpoint ran after it and will run again; a torn or damaged line among
        # them (a crash) goes with them: the log then ends exactly where the weights are
        log = self.run_dir / "trajectory.jsonl"
        if self.is_main and log.exists() and log.stat().st_size > 0:  # an empty file: a crash before its header
            tail = truncate(log, info.step, plan.digest)
            if tail.dropped:
                self._print(f"resume: {tail.describe(log, info.step)}")
        from .distributed import barrier

        barrier()

    # -- plumbing ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now (the last checkpoint and the log stay valid)
        self._stop = signum  # acted on between steps, on every rank at the same step

    def _preempted(self) -> bool:
        flag = torch.tensor([1.0 if self._stop is not None else 0.0], dtype=torch.float64)
        return bool(self.engine.all_reduce(flag)[0] > 0)

    def _exit_on_signal(self, what: str) -> None:
        """After the checkpoint: SIGTERM (preemption) exits 75, which launch/slurm.sbatch requeues;
        SIGINT (Ctrl-C) exits 130, the shell's code for an interrupt (no requeue)."""
        sig = self._stop if self._stop is not None else signal.SIGTERM
        name, code = ("SIGINT", EXIT_INTERRUPTED) if sig == signal.SIGINT else ("SIGTERM", EXIT_PREEMPTED)
        then = "for requeue" if code == EXIT_PREEMPTED else "(continue with --resume)"
        self._print(f"{name}: {what}; exiting {code} {then}")
        sys.exit(code)

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(f"[zo_deepspeed] {msg}", flush=True)
