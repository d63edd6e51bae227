"""The trainer: task data, the ZO engine, evaluation, metrics, checkpoints and export.

``Trainer.train`` is the whole loop; each piece it calls (``train_step``,
``evaluate``, ``save``) is small and returns plain values. Everything that
runs a forward is collective under ZeRO-3, so every rank executes the same
number of forwards in the same order, with shards padded where needed.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .engine import ZOEngine, causal_lm_loss, initialize, replay
from .run_config import DEFAULT_DS_CONFIG, RunConfig, resolve_run_config
from .trajectory import read_log

__all__ = ["Trainer", "EvalResult", "setup_distributed", "EXIT_PREEMPTED", "build_ds_config", "load_tokenizer",
           "resolve_model_path", "batch_indices"]

# Exit status after a SIGTERM-triggered checkpoint: launch/slurm.sbatch requeues on it.
EXIT_PREEMPTED = 75


def setup_distributed() -> tuple[int, int]:
    """Join the process group the launcher set up; plain ``python`` runs as a world of one."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=None)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def resolve_model_path(path: str) -> str:
    if path == "default":
        from .models import ensure_default_model

        return str(ensure_default_model())
    if not Path(path).is_dir() or not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"model.path={path!r} is not an HF model folder (no config.json); "
                                "pass a local folder or 'default'")
    return path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"model.path={path} has no usable tokenizer ({first[:200]}); "
                         "put the model's own tokenizer files next to its weights") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_model_inputs(path: str, tokenizer, max_length: int) -> None:
    """Mistakes that would otherwise fail deep inside a forward (an index error) or silently mis-train."""
    from transformers import AutoConfig

    mc = AutoConfig.from_pretrained(path)
    vocab = getattr(mc, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size is {vocab}: "
                         "tokenizer and weights come from different models; use the model's own tokenizer files")
    ctx = next((getattr(mc, k) for k in ("max_position_embeddings", "n_positions") if getattr(mc, k, None)), None)
    if ctx and max_length > ctx:
        raise ValueError(f"data.max_length={max_length} is longer than the model's context ({ctx} positions in "
                         f"{path}/config.json); set data.max_length <= {ctx}")


def check_writable(run_dir: Path) -> None:
    """Read-only check that train.output_dir can be created, before anything is written."""
    p = Path(run_dir).absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"train.output_dir={run_dir} cannot be written ({p} is not a writable directory); "
                         "pick a writable train.output_dir")


def build_ds_config(cfg: RunConfig, world: int, run_dir: Path | None) -> dict:
    """The ds_config for this run: the user's file (or the embedded default) with "auto" filled in."""
    from .ds_config import fill_auto, load_ds_config, validate_ds_config

    ds = load_ds_config(cfg.deepspeed) if cfg.deepspeed else json.loads(json.dumps(DEFAULT_DS_CONFIG))
    t = cfg.train
    if t.batch_size % (world * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} does not divide into world size {world} x "
                         f"train.grad_accum={t.grad_accum}; pick a multiple of {world * t.grad_accum}")
    ds = fill_auto(ds, micro_batch=t.batch_size // (world * t.grad_accum), grad_accum=t.grad_accum, world_size=world)
    validate_ds_config(ds, world_size=world)
    half = "bfloat16" if (ds.get("bf16") or {}).get("enabled") else ("float16" if (ds.get("fp16") or {}).get("enabled")
                                                                      else None)
    if half and cfg.model.dtype != half:
        raise ValueError(f"ds_config enables {half} but model.dtype={cfg.model.dtype}; set model.dtype={half}")
    if run_dir is not None and "csv_monitor" not in ds:
        ds["csv_monitor"] = {"enabled": True, "output_path": str(run_dir / "monitor"), "job_name": "csv"}
        try:
            import tensorboard  # noqa: F401

            ds.setdefault("tensorboard", {"enabled": True, "output_path": str(run_dir / "monitor"),
                                          "job_name": "tensorboard"})
        except ImportError:
            pass
    return ds


@dataclass(frozen=True)
class EvalResult:
    split: str
    metric: str
    value: float
    n: int


class _RunLock:
    """One run per directory: a second process pointed at a live run dir refuses to start."""

    def __init__(self, run_dir: Path):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.f = open(run_dir / ".lock", "a")  # "a": never truncates anything
        except OSError as e:  # read-only file system and the like (check_writable cannot see those)
            raise RuntimeError(f"train.output_dir={run_dir} cannot be written ({e}); pick a writable "
                               "train.output_dir") from None
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"run directory {run_dir} is in use by another run; "
                               "pick another train.output_dir or stop that run") from None


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> list[int]:
    """Indices into the n training examples of step ``step``'s global batch: a pure function of (seed, step),
    so a resumed run, and any reference trained outside the trainer, sees the same batches."""
    rng = random.Random(f"{seed}/batch/{step}")
    return rng.sample(range(n), batch_size) if batch_size <= n else [rng.randrange(n) for _ in range(batch_size)]


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, eval_only: bool = False):
        from .tasks import build_splits, get_task

        self.cfg = cfg
        self.rank, self.world = setup_distributed()
        self.run_dir = Path(cfg.train.output_dir)
        self.is_main = self.rank == 0
        self.eval_only = eval_only
        # Every check up to the lock only reads: a refused run writes nothing (no run dir, no checkpoint).
        if self.is_main and not eval_only:
            if not resume and (self.run_dir / "trajectory.jsonl").exists():
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                      "or choose another train.output_dir")
            check_writable(self.run_dir)
        if not eval_only and cfg.train.steps > 0 and cfg.zo.lr == 0:
            raise ValueError("zo.lr=0 with train.steps > 0 would change no weight; set zo.lr > 0 (MeZO: 1e-6 or "
                             "1e-7), or train.steps=0 to only evaluate")
        self.task = get_task(cfg.data.task)
        self.splits = build_splits(self.task, cfg.data.data_dir, seed=cfg.zo.seed, num_train=cfg.data.num_train,
                                   num_dev=cfg.data.num_dev, num_test=cfg.data.num_test,
                                   k_per_class=cfg.data.k_per_class or None)
        if not self.splits["train"] and cfg.train.steps > 0:
            raise ValueError(f"task {cfg.data.task} has no training examples")
        self.cfg = cfg = resolve_run_config(cfg)  # objective auto -> the task's; zo.total_steps 0 -> train.steps
        self.objective = cfg.train.objective
        if self.objective in ("accuracy", "choice") and self.task.kind != "classification":
            raise ValueError(f"train.objective={self.objective} scores candidates: classification tasks only; "
                             "use train.objective=loss or f1 for generation tasks")
        if self.objective == "f1" and self.task.kind != "generation":
            raise ValueError(f"train.objective=f1 scores generations: generation tasks only; use "
                             f"train.objective=accuracy or choice for {cfg.data.task}")
        self.model_path = resolve_model_path(cfg.model.path)
        self.tokenizer = load_tokenizer(self.model_path)
        check_model_inputs(self.model_path, self.tokenizer, cfg.data.max_length)
        self.ds_config = build_ds_config(cfg, self.world, None if eval_only else self.run_dir)
        if self.is_main and not eval_only:
            self._lock = _RunLock(self.run_dir)  # the first write; DeepSpeed's monitors write next
        dtype = getattr(torch, cfg.model.dtype)
        from transformers import AutoModelForCausalLM

        loss_fn = {"loss": causal_lm_loss, "choice": self._choice_loss, "accuracy": self._neg_accuracy,
                   "f1": self._neg_f1}[self.objective]
        from .adapters import adapt

        self.engine: ZOEngine = initialize(  # with adapter.mode lora/prefix only the adapter is trained
            adapt(lambda: AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype), cfg.adapter),
            self.ds_config, cfg.zo, loss_fn=loss_fn, trajectory=None)
        self.monitor = getattr(self.engine.ds_engine, "monitor", None)
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if resume:
            self._resume()
        self.log = None
        if eval_only:
            return
        if self.is_main:
            ckpt.atomic_write_text(self.run_dir / "config.json", json.dumps(
                {**cfg.to_dict(), "resolved_ds_config": self.ds_config, "world_size": self.world}, indent=1))
        self._open_log()

    # -- loop --------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        summary: dict = {}
        if t.zero_shot_eval and self.engine.step_count == 0:
            summary["zero_shot"] = self.evaluate("test")
            self._metrics({"step": 0, f"test/{summary['zero_shot'].metric}": summary["zero_shot"].value})
        bar = self._progress()
        while self.engine.step_count < t.steps:
            res = self.train_step()
            step = self.engine.step_count
            self._metrics({"step": step, "loss": res.loss, "g": res.g[0], "lr": res.lr, "skipped": res.skipped})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.4f}", g=f"{res.g[0]:+.3g}")
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                ev = self.evaluate("dev")
                self._metrics({"step": step, f"dev/{ev.metric}": ev.value})
            if t.save_every and step % t.save_every == 0:
                self.save()
            if self._preempted():
                self.save()
                self._print(f"SIGTERM: checkpoint at step {step} written; exiting {EXIT_PREEMPTED} for requeue")
                sys.exit(EXIT_PREEMPTED)
        if bar is not None:
            bar.close()
        self.save()
        summary["final"] = self.evaluate("test")
        self._metrics({"step": self.engine.step_count, f"test/{summary['final'].metric}": summary["final"].value})
        if t.export:
            ckpt.export_hf(self.engine, self.run_dir / "export", self.tokenizer)
        return summary

    def train_step(self):
        t, step = self.cfg.train, self.engine.step_count
        ids = self.batch_ids(step)
        mine = list(torch.tensor_split(torch.tensor(ids), self.world)[self.rank].tolist())
        examples = [self.splits["train"][i] for i in mine]
        micro = []
        for chunk in torch.tensor_split(torch.arange(len(examples)), t.grad_accum):
            exs = [examples[i] for i in chunk.tolist()]
            if self.objective == "loss":
                micro.append(self._encode(exs))
            else:
                micro.append({"examples": exs})
        res = self.engine.step(micro, example_ids=[self.splits["train"][i].id for i in ids])
        if self.log is not None:
            self.log.append_result(res, self.cfg.zo, [self.splits["train"][i].id for i in ids])
        return res

    def batch_ids(self, step: int) -> list[int]:
        return batch_indices(self.cfg.zo.seed, step, len(self.splits["train"]), self.cfg.train.batch_size)

    def _encode(self, examples):
        from .tasks import encode_for_training

        return encode_for_training(self.tokenizer, examples, self.cfg.data.max_length)

    def _neg_accuracy(self, forward, batch):
        from .tasks import score_candidates

        exs = batch["examples"]
        preds, _ = score_candidates(forward, self.tokenizer, exs, self.cfg.data.max_length, batch_size=len(exs))
        correct = sum(int(p == ex.label) for p, ex in zip(preds, exs))
        return torch.tensor(-float(correct), dtype=torch.float64), torch.tensor(float(len(exs)), dtype=torch.float64)

    def _neg_f1(self, forward, batch):
        # -F1 of greedy generations: the g estimate only needs the two scalars, so the objective may be
        # non-differentiable. ``forward`` is unused: generate() drives the (perturbed) module itself, and
        # under ZeRO-3 with several ranks it runs synced (every rank decodes until all are done).
        exs = batch["examples"]
        preds = self._generate(exs)
        f1 = sum(self.task.score([ex], [p])["f1"] for ex, p in zip(exs, preds))
        return torch.tensor(-f1, dtype=torch.float64), torch.tensor(float(len(exs)), dtype=torch.float64)

    def _choice_loss(self, forward, batch):
        # Cross-entropy of the gold candidate among all candidates, from their mean token NLLs: pushes the
        # right option above the wrong ones (what accuracy measures) rather than raising every option's
        # likelihood. No autograd needed, so the scorer's Python floats are fine.
        from .tasks import score_candidates

        exs = batch["examples"]
        _, losses = score_candidates(forward, self.tokenizer, exs, self.cfg.data.max_length, batch_size=len(exs))
        total = 0.0
        for ex, nll in zip(exs, losses):
            logits = -torch.tensor(nll, dtype=torch.float64)
            total += float(-torch.log_softmax(logits, 0)[ex.label])
        return torch.tensor(total, dtype=torch.float64), torch.tensor(float(len(exs)), dtype=torch.float64)

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> EvalResult:
        """Collective: each rank scores a contiguous shard; every rank runs the same number of forwards."""
        from .tasks import score_candidates

        self.engine.flush()
        examples = self.splits[split]
        shards = [s.tolist() for s in torch.tensor_split(torch.arange(len(examples)), self.world)]
        mine = shards[self.rank]
        bs = self.cfg.train.eval_batch_size
        n_batches = -(-max(len(s) for s in shards) // bs) if examples else 0
        preds: list = []
        for b in range(n_batches):
            idx = mine[b * bs:(b + 1) * bs]
            chunk = [examples[i] for i in idx] or [examples[0]]  # padding forward: result discarded
            if self.task.kind == "classification":
                p, _ = score_candidates(self.engine._forward, self.tokenizer, chunk, self.cfg.data.max_length,
                                        batch_size=len(chunk))
            else:
                p = self._generate(chunk)
            preds += p[:len(idx)]
        local = self.task.score([examples[i] for i in mine], preds)[self.task.metric] * len(mine) if mine else 0.0
        tot = self.engine._all_reduce(torch.tensor([local, float(len(mine))], dtype=torch.float64))
        value = float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")
        res = EvalResult(split, self.task.metric, value, int(tot[1]))
        self._print(f"{split} {res.metric}: {res.value:.4f} on {res.n} examples (step {self.engine.step_count})")
        return res

    def _generate(self, examples) -> list[str]:
        from .tasks import generate_answers

        return generate_answers(self.engine.module, self.tokenizer, examples, self.cfg.data.max_length,
                                device=self.engine.device, synced=self.world > 1)

    # -- state -----------------------------------------------------------------------------
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.engine, self.run_dir, extra={"seed": self.cfg.zo.seed},
                                    keep=self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        last = ckpt.latest_checkpoint(self.run_dir)
        if last is None:
            self._print("resume: no checkpoint yet; starting from the base weights")
            self._truncate_log(0)
            return
        try:
            info = ckpt.load_checkpoint(self.engine, last)
            self._print(f"resume: loaded {last.name} (step {info.step})")
        except ckpt.CheckpointMismatch as e:
            # another world size or layout: rebuild the weights by replaying the log up to the checkpoint
            _, records = read_log(self.run_dir / "trajectory.jsonl")
            step = json.loads((last / "state.json").read_text())["step"]
            replay(None, [r for r in records if r.step < step], engine=self.engine)
            self.engine.step_count = step
            self._print(f"resume: {e}; replayed {step} logged steps instead")
        self._truncate_log(self.engine.step_count)
        if self.cfg.zo.optimizer == "momentum":  # the momentum is the (seed, g) history of the last steps
            _, records = read_log(self.run_dir / "trajectory.jsonl")
            self.engine.rule.rebuild(records[-self.cfg.zo.momentum_window:])

    def _truncate_log(self, step: int) -> None:
        """Drop log records past ``step``: those steps ran after the checkpoint and will run again."""
        path = self.run_dir / "trajectory.jsonl"
        if self.is_main and path.exists():
            lines = path.read_text().splitlines()
            keep = lines[:1] + [ln for ln in lines[1:] if _record_step(ln) is not None and _record_step(ln) < step]
            ckpt.atomic_write_text(path, "".join(ln + "\n" for ln in keep))
        if self.world > 1:
            torch.distributed.barrier()

    def _open_log(self) -> None:
        self.log = None
        if self.is_main:
            self.log = _Log(self.run_dir, self.engine, self.cfg, self.model_path)

    # -- plumbing ----------------------------------------------------------------------------
    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True  # acted on between steps, on every rank at the same step

    def _preempted(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0], dtype=torch.float64)
        return bool(self.engine._all_reduce(flag)[0] > 0)

    def _metrics(self, rec: dict) -> None:
        if not self.is_main:
            return
        rec = {**rec, "time": time.time()}
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            step = rec["step"]
            self.monitor.write_events([(f"zo/{k}", float(v), step) for k, v in rec.items()
                                       if k not in ("step", "time") and isinstance(v, (int, float))])

    def _progress(self):
        if not self.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.engine.step_count, desc="zo", unit="step",
                    dynamic_ncols=True)

    def _print(self, msg: str) -> None:
        if self.is_main:
            print(f"[zo_deepspeed] {msg}", flush=True)


def _record_step(line: str):
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn record from a crash mid-write


class _Log:
    """Rank 0's trajectory log for a trainer run (header carries the config)."""

    def __init__(self, run_dir: Path, engine: ZOEngine, cfg: RunConfig, model_path: str):
        from .trajectory import StepRecord, TrajectoryLog

        self._rec = StepRecord
        self.log = TrajectoryLog(run_dir / "trajectory.jsonl", header={
            "zo": vars(cfg.zo), "restore": engine.state.restore, "model": cfg.model.path, "task": cfg.data.task,
            # `replay` checks it: a log applied to another base model would silently produce garbage
            "base_fingerprint": ckpt.model_fingerprint(model_path),
            "adapter": cfg.adapter.to_dict()})  # replay builds the same adapter on the base model

    def append_result(self, res, zo, ids) -> None:
        self.log.append(self._rec(res.step, res.seeds, res.g, res.lr, zo.weight_decay, zo.eps, res.loss_plus,
                                  res.loss_minus, res.skipped, tuple(ids), res.update, res.decay))
