"""The trainer: the loop over ZO steps, with evaluation, metrics, checkpoints and export around it.

``Trainer.train`` is the whole loop and hands off to :meth:`Trainer.train_step` (one engine step on
this rank's share of the batch), the :class:`Evaluator`, and the checkpointer
(:mod:`zo_deepspeed.checkpoint`). With ``train.select`` dev_loss/dev_metric it also keeps the best
checkpoint by dev (evaluated every ``train.eval_every`` steps, MeZO's protocol) and reports test there and
at the end; ``summary.json`` holds the run's results (what the ``mezo`` recipe's table reads). Run setup
(process group, data, tokenizer, ds_config) is :mod:`zo_deepspeed.build`; the objectives are :mod:`zo_deepspeed.tasks.objectives`. Everything that
runs a forward is collective under ZeRO-3, so every rank executes the same forwards in the same order.
"""
from __future__ import annotations

import json
import random
from dataclasses import replace
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
from .monitor import MetricsLog, truncate as truncate_metrics
from .run_config import RunConfig
from .tasks.objectives import Objective
from .tasks.protocol import encoding_tokenizer
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
    if t.select != "last" and t.steps > 0 and not splits["dev"]:
        raise ValueError(f"train.select={t.select} chooses a checkpoint by dev, but task {d.task} has no dev "
                         f"examples (data.num_dev={d.num_dev}); set data.num_dev > 0 or train.select=last")


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
        # the encoders' view of the tokenizer (MeZO's OPT BOS rule); generation rows leave room for the answer
        tok = encoding_tokenizer(s.tokenizer, s.model_path, cfg.data.bos_token_id, verbose=self.is_main)
        d = cfg.data
        self.train_length = d.max_length - (d.max_new_tokens if s.task.kind == "generation" else 0)
        if self.train_length < 1:
            raise ValueError(f"data.max_new_tokens={d.max_new_tokens} leaves no room for a prompt in "
                             f"data.max_length={d.max_length}; lower data.max_new_tokens or raise data.max_length")
        # generation (the f1 objective) drives the engine's module: bound late, once the engine exists
        self.objective = Objective(cfg.train.objective, s.task, tok, self.train_length,
                                   generate=lambda exs: self.evaluator.generate(exs))
        self.best: dict | None = None  # train.select: {"step", "value", "key"} of the best dev evaluation so far
        self._saved: tuple[int | None, Path | None] = (None, None)  # (step, path) of the last checkpoint written
        self._stop = None  # the signal that asked for a stop (acted on between steps)
        created = RunDirUndo(self.run_dir) if self.is_main else None
        try:
            if self.is_main:
                self._lock = RunLock(self.run_dir)  # the first write; DeepSpeed's monitors write next
                created.armed = True
            self._build(cfg, s, tok, resume)
        except BaseException:
            if created is not None:
                created.undo()  # a refused or interrupted start leaves the run directory as it found it
            raise

    def _build(self, cfg: RunConfig, s, tok, resume: bool) -> None:
        d = cfg.data
        self.engine = build_engine(s, self.objective)
        self.evaluator = Evaluator(self.engine, s.task, tok, d.max_length, cfg.train.eval_batch_size, d.max_new_tokens,
                                   d.answer_first_line)
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
        self.truncation = self._truncation(tok) if self.is_main else {}
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
            improved = False
            # train.select: MeZO evaluates dev at every multiple of eval_steps, the last step included
            if t.eval_every and step % t.eval_every == 0 and (step < t.steps or t.select != "last"):
                improved = self.dev_eval(step)
            if (t.save_every and step % t.save_every == 0) or improved:
                self.save()
                if improved:
                    self._point_best()
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
        if self.best is not None:
            best = self.test_at_best(summary["final"])
            if best is not None:
                summary["best"] = best
        self._write_summary(summary)
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
        step = self.engine.step_count
        res = replace(self.evaluator.evaluate(split, self.setup.splits[split]), step=step)
        if res.n == 0:  # never a NaN in metrics.jsonl (_check_splits refuses the runs that would get here)
            self._print(f"{split}: no examples; not evaluated (step {step})")
            return res
        self._print(f"{split} {res.metric}: {res.value:.4f} on {res.n} examples (step {step})")
        if self.metrics is not None:
            self.metrics.write({"step": step, f"{split}/{res.metric}": res.value})
        return res

    # -- best-dev selection (train.select) -----------------------------------------------
    def dev_eval(self, step: int) -> bool:
        """Collective. The dev evaluation at ``step``: the metric (select last or dev_metric) or the training
        objective's mean (dev_loss, MeZO's criterion). True if it is the best so far (strictly, as HF's
        load_best_model_at_end): the caller then saves a checkpoint and points checkpoints/best at it."""
        select = self.cfg.train.select
        if select == "dev_loss":
            value = self.evaluator.loss(self.setup.splits["dev"], self.objective)
            key = "dev/loss"
            self._print(f"dev loss: {value:.6f} on {len(self.setup.splits['dev'])} examples (step {step})")
            if self.metrics is not None:
                self.metrics.write({"step": step, key: value})
        else:
            res = self.evaluate("dev")
            value, key = res.value, f"dev/{res.metric}"
        if select == "last":
            return False
        better = self.best is None or (value < self.best["value"] if select == "dev_loss" else value > self.best["value"])
        if better:
            self.best = {"step": step, "value": value, "key": key}
        return better

    def _point_best(self) -> None:
        if self.is_main:
            atomic_write_text(self.run_dir / "checkpoints" / "best", f"step_{self.best['step']:08d}")

    def test_at_best(self, final: EvalResult) -> EvalResult | None:
        """Collective. Test at the best dev checkpoint (loaded into the engine, which then stays there): MeZO's
        reported number. The final weights' test result if they are the best."""
        b = self.best
        if b["step"] == self.engine.step_count:
            res = final
        else:
            path = self.run_dir / "checkpoints" / f"step_{b['step']:08d}"
            try:
                ckpt.load_checkpoint(self.engine, path)
            except (ckpt.CheckpointMismatch, FileNotFoundError) as e:  # written before a resume at another layout
                self._print(f"test at the best dev checkpoint skipped: {path.name} cannot be loaded at this world size "
                            f"and layout ({e})")
                return None
            res = replace(self.evaluator.evaluate("test", self.setup.splits["test"]), step=b["step"])
        self._print(f"test {res.metric} at the best dev checkpoint (step {b['step']}, {b['key']} {b['value']:.6f}): "
                    f"{res.value:.4f} on {res.n} examples")
        if self.metrics is not None:
            self.metrics.write({"step": b["step"], f"test_at_best/{res.metric}": res.value})
        return res

    def _truncation(self, tok) -> dict:
        """Rank 0. Per split, the examples that lose prompt tokens to data.max_length (and, for generation test/dev
        prompts, those whose answer span is cut away): printed, and logged in metrics.jsonl."""
        from .tasks import truncation_report

        s, d = self.setup, self.cfg.data
        gen = s.task.kind == "generation"
        out = {}
        for split, exs in s.splits.items():
            if not exs:
                continue
            if split == "train":
                out[split] = truncation_report(tok, exs, self.train_length, targets=True)
            else:
                out[split] = truncation_report(tok, exs, d.max_length, reserve=d.max_new_tokens if gen else 0)
        parts = [f"{k} {v['truncated']}/{v['n']}" + (f" (answer cut from {v['answer_cut']})" if v.get("answer_cut")
                                                      else "") for k, v in out.items()]
        self._print(f"truncated to data.max_length={d.max_length}: " + ", ".join(parts)
                    + f"; longest row {max(v['longest'] for v in out.values())} tokens")
        if self.metrics is not None:
            rec = {"step": self.engine.step_count}
            for k, v in out.items():  # flat keys: "test/..." records are evaluation results to their readers
                rec[f"truncated_{k}"] = v["truncated"]
                if "answer_cut" in v:
                    rec[f"answer_cut_{k}"] = v["answer_cut"]
            self.metrics.write(rec)
        return out

    def _write_summary(self, summary: dict[str, EvalResult]) -> None:
        """Rank 0. summary.json: the run's results and what produced them (the mezo recipe's table reads it)."""
        if not self.is_main:
            return
        c = self.cfg
        res = {k: {"metric": v.metric, "value": v.value, "n": v.n} for k, v in summary.items()}
        rec = {"kind": "train", "task": c.data.task, "metric": self.setup.task.metric, "steps": c.train.steps, "select": c.train.select, "objective": c.train.objective,
               "adapter": c.adapter.mode, "lr": c.zo.lr, "eps": c.zo.eps, "seed": c.zo.seed, "model": c.model.path,
               "max_length": c.data.max_length, "num_train": len(self.setup.splits["train"]),
               "num_dev": len(self.setup.splits["dev"]), "num_test": len(self.setup.splits["test"]),
               "best": self.best, "results": res, "truncation": self.truncation}
        atomic_write_text(self.run_dir / "summary.json", json.dumps(rec, indent=1))

    # -- state -----------------------------------------------------------------------------
    def save(self) -> Path:
        """Collective. A checkpoint of this step (once: a step saved already is not written again)."""
        step = self.engine.step_count
        if self._saved[0] != step:
            self._saved = (step, ckpt.save_checkpoint(self.engine, self.run_dir,
                                                      extra={"seed": self.cfg.zo.seed, "best": self.best},
                                                      keep=self.cfg.train.keep_checkpoints))
        return self._saved[1]

    def _resume(self) -> None:
        plan = self.plan
        info = ckpt.resume(self.engine, self.run_dir)
        rerun = plan.logged - info.step  # logged steps past the checkpoint: they run again
        self.best = info.extra.get("best")  # train.select: the best dev evaluation before the checkpoint
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
        # the metrics too, so that each step's record is there once (monitor.truncate); first, because a
        # malformed line refuses the resume there, before the trajectory log is touched
        if self.is_main:
            dropped = truncate_metrics(self.run_dir / "metrics.jsonl", info.step)
            if dropped:
                self._print(f"resume: metrics.jsonl cut back to step {info.step} ({dropped} record(s) dropped; "
                            "the resumed run writes them again)")
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
