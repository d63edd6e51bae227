"""The ZO engine: a DeepSpeed engine (or a plain module) plus the two-forward step.

Composition, not inheritance: :class:`ZOEngine` holds the DeepSpeed engine
for its forwards (which gather ZeRO-3 partitions), a :class:`Partitions`
view of the local pieces, and a :class:`WeightState` that edits them. Only
loss scalars cross ranks: one all-reduce per step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import faults
from .adapters import AdapterConfig, adapt, adapter_of
from .adapters import prepare as prepare_adapter
from .config import ZOConfig
from .partitions import Partitions, release_cpu_shm_names
from .trajectory import FORMAT, StepRecord, TrajectoryLog, read_log
from .rng import STREAM_VERSION
from .variants import UpdateRule, lr_at
from .update import Update, WeightState, derive_seed

__all__ = ["ZOEngine", "StepResult", "initialize", "replay", "causal_lm_loss", "LossFn"]

# loss_fn(forward, batch) -> (sum of per-example/per-token losses, count).
# Returning a sum and a count (not a mean) makes the all-reduced loss the exact
# global mean whatever the sharding, which is what makes world sizes agree.
LossFn = Callable[[Callable, dict], tuple[torch.Tensor, torch.Tensor]]

_log = logging.getLogger("zo_deepspeed")


def causal_lm_loss(forward: Callable, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level cross-entropy summed over positions whose label is not -100."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}
    # no KV cache: a scoring forward never decodes, and HF's default use_cache=True would keep
    # 2 x layers x batch x seq x kv_dim values alive for the whole forward
    inputs.setdefault("use_cache", False)
    logits = forward(**inputs).logits
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=-100, reduction="none")
    mask = target.reshape(-1) != -100
    return loss[mask].double().sum(), mask.sum().double()


@dataclass(frozen=True)
class StepResult:
    step: int
    loss_plus: float   # global mean loss at theta + eps z (first perturbation)
    loss_minus: float  # global mean loss at theta - eps z
    g: tuple[float, ...]  # projected gradient per perturbation (after clipping; 0 if skipped)
    seeds: tuple[int, ...]
    lr: float             # this step's learning rate (after the schedule)
    skipped: bool = False
    update: tuple[tuple[int, float], ...] = ()  # the (seed, coefficient) streams of the update
    decay: float = 0.0    # theta <- (1 - decay) * theta on >= 2-D parameters

    @property
    def loss(self) -> float:
        return 0.5 * (self.loss_plus + self.loss_minus)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ZOEngine:
    def __init__(self, module: torch.nn.Module, zo: ZOConfig, ds_engine=None, loss_fn: LossFn | None = None,
                 trajectory: str | Path | None = None, keepalive=None):
        self.zo = zo
        self.ds_engine = ds_engine
        self._module = module
        self._keepalive = keepalive  # HfDeepSpeedConfig: HF holds only a weakref to it
        self.loss_fn = loss_fn or causal_lm_loss
        # eval mode: dropout would make the two forwards of a step see
        # different networks, and g would measure the dropout noise.
        (ds_engine or module).eval()
        self.parts = Partitions(module, ds_engine)
        if zo.lr_schedule != "constant" and zo.total_steps <= 0:
            raise ValueError(f"zo.lr_schedule={zo.lr_schedule} decays to 0 at zo.total_steps: set zo.total_steps > 0 "
                             "(the trainer sets it to train.steps)")
        self.state = WeightState(self.parts, zo.restore, zo.distribution, zo.compile, zo.base_device)
        self.rule = UpdateRule(zo.optimizer, zo.momentum, zo.momentum_window)
        self.step_count = 0
        self.consecutive_skips = 0
        self.pending: Update | None = None
        self.rank, self.world_size = _world()
        self.device = ds_engine.device if ds_engine is not None else next(module.parameters()).device
        if zo.sparse_keep < 1.0:
            self._init_sparse()  # collective (one small all-reduce per bisection round): every rank, here
        self.log = None
        if trajectory is not None and self.rank == 0:
            self.log = TrajectoryLog(Path(trajectory), header={"zo": vars(zo), "restore": self.state.restore,
                                                               "world_size": self.world_size,
                                                               "adapter": adapter_header(module)})

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    # -- forwards ----------------------------------------------------------------
    def _forward(self, *args, **kwargs):
        return (self.ds_engine or self._module)(*args, **kwargs)

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    @torch.no_grad()
    def _losses(self, micro_batches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for mb in micro_batches:
            s, c = self.loss_fn(self._forward, self._to_device(mb))
            total += s.detach().double().cpu()
            count += torch.as_tensor(c).double().cpu()
        return total, count

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return t
        # the step's only collective besides the forwards' gathers; a host sync point
        dev = torch.device("cpu") if torch.distributed.get_backend() == "gloo" else self.device
        buf = t.to(dev)
        torch.distributed.all_reduce(buf)
        return buf.cpu()

    # -- the step ------------------------------------------------------------------
    def step(self, batch: dict | Sequence[dict], example_ids: Iterable | None = None) -> StepResult:
        """One ZO step on this rank's batch (a dict, or a list of micro-batches sharing z)."""
        micro = [batch] if isinstance(batch, dict) else list(batch)
        zo = self.zo
        t = self.step_count
        seeds = tuple(derive_seed(zo.seed, t, j) for j in range(zo.q))
        sums = torch.zeros(2 * zo.q + 1, dtype=torch.float64)
        for j, s in enumerate(seeds):
            # pass 1 of j: (pending update) + restore + show theta + eps z_j
            self.state.transition(self.pending if j == 0 else None, [(s, zo.eps)])
            self.pending = None
            faults.crash_point("perturbed", t)  # crash tests: die holding theta + eps z (inert otherwise)
            sums[j], count = self._losses(micro)
            # pass 2 of j: show theta - eps z_j
            self.state.transition(None, [(s, -zo.eps)])
            sums[zo.q + j], _ = self._losses(micro)
        sums[-1] = count
        if faults.hit("nan", t) or faults.hit("inf", t):  # fault injection (tests): a bad loss on this rank
            sums[0] = math.nan if faults.hit("nan", t) else math.inf
        if not bool(torch.isfinite(sums).all()):
            # only this rank knows its own loss was bad: say which rank, the step is skipped below
            _log.warning("zo_deepspeed: rank %d: non-finite loss at step %d (local L+/L- sums %s)", self.rank, t,
                         sums[:-1].tolist())
        sums = self._all_reduce(sums)
        n = float(sums[-1])
        if n <= 0:
            raise ValueError("the batch has no loss positions on any rank (all labels are -100?)")
        lp = [float(sums[j]) / n for j in range(zo.q)]
        lm = [float(sums[zo.q + j]) / n for j in range(zo.q)]
        g = [(a - b) / (2 * zo.eps) for a, b in zip(lp, lm)]
        skipped = not all(math.isfinite(x) for x in g)
        if skipped:
            g = [0.0] * zo.q
        elif zo.max_abs_g > 0:
            g = [max(-zo.max_abs_g, min(zo.max_abs_g, x)) for x in g]
        lr = lr_at(zo.lr, zo.lr_schedule, t, zo.warmup_steps, zo.total_steps)
        terms, decay = (), 0.0
        if skipped:
            self.rule.skip(seeds)
        else:
            terms, decay = self.rule.terms(seeds, g, lr), lr * zo.weight_decay
            if terms or decay:
                self.pending = Update(decay, terms)
        if not zo.fuse_update:
            self.flush()
        res = StepResult(t, lp[0], lm[0], tuple(g), seeds, lr, skipped, terms, decay)
        if self.log is not None:
            ids = list(example_ids) if example_ids is not None else []
            self.log.append(StepRecord(t, seeds, tuple(g), lr, zo.weight_decay, zo.eps, lp[0], lm[0],
                                       skipped, tuple(ids), terms, decay))
        self.step_count += 1
        # g is all-reduced, so every rank takes these branches at the same step: no rank is left behind
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped and self.rank == 0:
            _log.warning("zo_deepspeed: step %d skipped on every rank: non-finite loss (L+=%s, L-=%s); "
                         "weights not updated (%d skipped in a row)", t, lp[0], lm[0], self.consecutive_skips)
        if skipped and 0 < zo.max_consecutive_skips <= self.consecutive_skips:
            raise RuntimeError(f"stopping: {self.consecutive_skips} consecutive steps had a non-finite loss "
                               f"(last: step {t}); check the data and model.dtype, lower zo.lr or zo.eps, "
                               f"or raise zo.max_consecutive_skips (0: never stop)")
        return res

    def _init_sparse(self) -> None:
        from .sparse import magnitude_thresholds

        if self.state.restore == "inplace":
            raise ValueError("zo.sparse_keep < 1 reads the mask from an exact copy of theta: set zo.restore=master "
                             "(float32 copy) or zo.restore=backup (copy in the partition dtype)")
        self.state.thresholds = magnitude_thresholds(self.state.primary_bases(), self.zo.sparse_keep,
                                                     self._all_reduce if self.parts.zero3 else None)

    def flush(self) -> None:
        """Apply the pending update and restore: the partitions then hold theta exactly.
        Needed before evaluation, checkpointing or export when fuse_update is on."""
        self.state.transition(self.pending, [])
        self.pending = None

    @torch.no_grad()
    def eval_loss(self, batch: dict | Sequence[dict]) -> float:
        """Global mean loss at theta on this rank's batch (flushes first)."""
        self.flush()
        micro = [batch] if isinstance(batch, dict) else list(batch)
        s, c = self._losses(micro)
        t = self._all_reduce(torch.stack([s, c]))
        return float(t[0] / t[1])


def adapter_header(module) -> dict | None:
    """The trajectory header's record of the module's LoRA/prefix adapter (None: full-parameter)."""
    a = adapter_of(module)
    return a.to_dict() if a is not None else None


def _fill_batch(cfg: dict, world_size: int) -> dict:
    # Batch sizes are DeepSpeed bookkeeping here (we never call engine.step);
    # fill them so that tbs = micro * gas * world holds.
    cfg = dict(cfg)
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if cfg.get(k) == "auto":
            del cfg[k]
    if "train_batch_size" not in cfg and "train_micro_batch_size_per_gpu" not in cfg:
        cfg["train_micro_batch_size_per_gpu"] = 1
    return cfg


def initialize(model, config: dict | str | Path | None = None, zo: ZOConfig | None = None,
               loss_fn: LossFn | None = None, trajectory: str | Path | None = None) -> ZOEngine:
    """Wrap ``model`` for ZO training.

    ``model`` is an ``nn.Module``, or a zero-argument callable that builds one
    (e.g. ``lambda: AutoModelForCausalLM.from_pretrained(path)``): the callable
    is run while a ``HfDeepSpeedConfig`` is alive, so ZeRO-3 partitions the
    model as it is constructed or loaded and no rank ever holds all of it.
    ``config`` is a DeepSpeed config (dict or JSON path); ``None`` runs the
    plain module without DeepSpeed (single-process reference).
    """
    zo = zo or ZOConfig()
    if config is None:
        m = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
        prepare_adapter(m)
        return ZOEngine(m, zo, None, loss_fn, trajectory)
    import deepspeed

    from .ds_config import load_ds_config, validate_ds_config

    cfg = load_ds_config(config)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        deepspeed.init_distributed(dist_backend=None)
    cfg = _fill_batch(cfg, torch.distributed.get_world_size())
    validate_ds_config(cfg, world_size=torch.distributed.get_world_size())
    keepalive = None
    if callable(model) and not isinstance(model, torch.nn.Module):
        stage = int((cfg.get("zero_optimization") or {}).get("stage", 0))
        if stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            keepalive = HfDeepSpeedConfig(cfg)
        model = model()
    ds_engine, *_ = deepspeed.initialize(model=model, config=cfg)
    release_cpu_shm_names()  # DeepSpeed's CPU backend (set up by now) would leave ~66 MB per rank in /dev/shm
    # prefix tuning's init from activations: a (collective) forward, before the ZO state snapshots theta
    prepare_adapter(ds_engine.module, ds_engine.device)
    return ZOEngine(ds_engine.module, zo, ds_engine, loss_fn, trajectory, keepalive)


def replay(model, log: str | Path | Sequence[StepRecord], config: dict | str | Path | None = None,
           zo: ZOConfig | None = None, engine: ZOEngine | None = None, adapter: AdapterConfig | None = None
           ) -> ZOEngine:
    """Apply a trajectory log to base weights; returns an engine holding the replayed weights.

    Pass the same restore mode and dist as the live run (taken from the log
    header when ``zo`` is None). Works at any world size and layout. A run
    with a LoRA/prefix adapter (``adapter``, or the log header's when None)
    gets the same adapter built on ``model`` (the base model) first.
    """
    if isinstance(log, (str, Path)):
        header, records = read_log(log)
        if header.get("format") != FORMAT:
            raise ValueError(f"{log} is not a zo_deepspeed trajectory log")
        if header.get("z_stream", STREAM_VERSION) != STREAM_VERSION:
            raise ValueError(f"{log} was written with z stream {header['z_stream']!r}; this zo_deepspeed generates "
                             f"{STREAM_VERSION!r}: replay it with the zo_deepspeed version that wrote it")
        if zo is None and "zo" in header:
            zo = ZOConfig.from_dict(header["zo"])
        if adapter is None:
            adapter = AdapterConfig.from_dict(header.get("adapter"))
    else:
        records = list(log)
    if engine is None:
        engine = initialize(adapt(model, adapter or AdapterConfig()), config, zo or ZOConfig())
    for r in records:
        if r.skipped:
            continue
        if r.update is not None:  # the exact streams the live step applied (any optimizer, schedule)
            upd = Update(r.decay, r.update)
        else:  # logs written before the update was recorded: plain ZO-SGD
            upd = Update(r.lr * r.weight_decay, tuple((s, -r.lr * g / r.q) for s, g in zip(r.seeds, r.g)))
        if upd.terms or upd.decay:
            engine.state.transition(upd, [])
    engine.step_count = (records[-1].step + 1) if records else 0
    return engine

