"""The ZO engine: a DeepSpeed engine (or a plain module) plus the two-forward step.

Composition, not inheritance: :class:`ZOEngine` holds the DeepSpeed engine
for its forwards (which gather ZeRO-3 partitions), a :class:`Partitions`
view of the local pieces, and a :class:`WeightState` that edits them. Only
loss scalars cross ranks: one all-reduce per step.
"""
from __future__ import annotations

import dataclasses
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
from . import distributed
from .distributed import all_reduce, world
from .partitions import Partitions, gathered_bytes, release_cpu_shm_names
from .estimators import local_blocks, n_blocks, projected_gradients, step_loss
from .perturb import ReadPerturbation, pair_order
from .profile import StepProfile, Stopwatch, peak_memory
from .trajectory import LogError, LogHeader, StepRecord, TrajectoryLog, read_log
from .update import Update, WeightState, derive_seed
from .variants import UpdateRule, lr_at

__all__ = ["ZOEngine", "StepResult", "Layout", "initialize", "replay", "causal_lm_loss", "LossFn"]

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
    loss_minus: float  # global mean loss at theta - eps z (fzoo: at theta, the clean block)
    g: tuple[float, ...]  # projected gradient per perturbation (after clipping; 0 if skipped)
    seeds: tuple[int, ...]
    lr: float             # this step's learning rate (after the schedule)
    skipped: bool = False
    update: tuple[tuple[int, float], ...] = ()  # the (seed, coefficient) streams of the update
    decay: float = 0.0    # theta <- (1 - decay) * theta on >= 2-D parameters
    profile: StepProfile | None = None  # this rank's time, edits, gathered bytes and peak memory
    losses: tuple[float, ...] = ()  # every block's global mean loss (estimators.py: the blocks' order)
    estimator: str = "spsa"

    @property
    def loss(self) -> float:
        """spsa: the mean of L+ and L- of the first perturbation; fzoo: the clean loss."""
        return step_loss(self.estimator, self.losses) if self.losses else 0.5 * (self.loss_plus + self.loss_minus)


@dataclass(frozen=True)
class Layout:
    """Where a run's weights live: a checkpoint's tensors load back only into the same layout."""

    world_size: int
    kind: str      # Partitions.kind: replica | zero3 | zero3-hpz | zero3-nvme
    restore: str   # the resolved restore mode

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "layout": self.kind, "restore": self.restore}


def _rowwise(module: torch.nn.Module) -> bool:
    """Whether the model is known to compute the rows of a batch independently (HF causal LMs and the
    peft models wrapping them): what a K-block forward over a stacked batch needs."""
    from transformers import PreTrainedModel

    base = module.get_base_model() if adapter_of(module) is not None else module  # peft: the wrapped LM
    return isinstance(base, PreTrainedModel)


class ZOEngine:
    """The ZO step over a module's local pieces. Its state (step counter, deferred update, the
    rule's history, and the weight state's offset and thresholds) changes only through its own
    methods: :meth:`step`, :meth:`flush`, :meth:`replay` and :meth:`load_state_dict`."""

    def __init__(self, module: torch.nn.Module, zo: ZOConfig, ds_engine=None, loss_fn: LossFn | None = None,
                 keepalive=None):
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
        self.rank, self.world_size = world()
        # perturbation parallelism: ranks p = rank % P of a data group evaluate the seeds j = p (mod P) of the
        # step on the same data shard; data groups d = rank // P take different shards
        P = zo.perturb_parallel
        if self.world_size % P:
            raise ValueError(f"zo.perturb_parallel={P} does not divide the world size {self.world_size}; pick a "
                             "divisor (ranks of one data group evaluate different perturbations)")
        self.pgroup, self.data_shard = self.rank % P, (self.rank // P, self.world_size // P)
        self.device = ds_engine.device if ds_engine is not None else next(module.parameters()).device
        self.perturb = zo.resolved_perturb(rowwise=_rowwise(module))
        if P > 1 and self.perturb != "forward":
            raise ValueError("zo.perturb_parallel > 1 needs zo.perturb=forward, which this model does not get (not a "
                             "HF/peft language model): set zo.perturb=forward if its batch rows are independent")
        # collective when zo.sparse_keep < 1 (one small all-reduce per bisection round): every rank, here
        self.state = WeightState(self.parts, zo.restore, zo.distribution, zo.compile, zo.base_device, zo.sparse_keep,
                                 self.all_reduce if self.parts.zero3 else None, self.perturb)
        # perturb on read: the modules' forwards evaluate theta + c_k z_k for the K blocks of a stacked batch
        self.read = ReadPerturbation(module, self.parts.params, zo.distribution, zo.compile, self.state.thresholds) \
            if self.perturb == "forward" else None
        self.rule = UpdateRule(zo.optimizer, zo.momentum, zo.momentum_window)
        self._step = 0
        self._skips = 0
        self._pending: Update | None = None
        self.log: TrajectoryLog | None = None

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    @property
    def step_count(self) -> int:
        """Steps taken (the index of the next step)."""
        return self._step

    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, self.parts.kind, self.state.restore)

    def open_log(self, path: str | Path, *, model: str | None = None, task: str | None = None,
                 base_fingerprint: str | None = None) -> None:
        """Record every step from now on in the trajectory log at ``path`` (rank 0 writes; a new
        file gets this run's header, an existing one is verified and continued)."""
        if self.rank != 0:
            return
        adapter = adapter_of(self._module)
        log = TrajectoryLog(path, LogHeader(
            zo=dataclasses.asdict(self.zo), restore=self.state.restore, world_size=self.world_size,
            adapter=adapter.to_dict() if adapter is not None else None, model=model, task=task,
            base_fingerprint=base_fingerprint))
        if log.next_step != self._step:
            raise LogError(f"{path} holds steps 0..{log.next_step - 1} but the engine is at step {self._step}: "
                           "the log must end where the weights are (resume truncates it to the checkpoint)")
        self.log = log

    # -- forwards ----------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The module's forward (through DeepSpeed, which gathers ZeRO-3 partitions). Collective."""
        return (self.ds_engine or self._module)(*args, **kwargs)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, on the host; the step's only collective besides the forwards' gathers."""
        return all_reduce(t, self.device)

    def to_device(self, batch: dict) -> dict:
        """``batch`` with its tensors on the device this rank's forwards run on."""
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    @torch.no_grad()
    def _losses(self, micro_batches: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.float64)
        for mb in micro_batches:
            s, c = self.loss_fn(self.forward, self.to_device(mb))
            total += s.detach().double().cpu()
            count += torch.as_tensor(c).double().cpu()
        return total, count

    # -- the step ------------------------------------------------------------------
    def step(self, batch: dict | Sequence[dict], example_ids: Iterable | None = None) -> StepResult:
        """One ZO step on this rank's batch (a dict, or a list of micro-batches sharing z).
        ``example_ids``: the global batch's example ids, recorded in the trajectory log."""
        micro = [batch] if isinstance(batch, dict) else list(batch)
        zo = self.zo
        t = self._step
        seeds = tuple(derive_seed(zo.seed, t, j) for j in range(zo.q))
        watch, edited = Stopwatch(self.device), self.state.edited
        if self.parts.zero3:
            gathered_bytes()  # drop what came before this step (evaluation, export): the profile is the step's
        # this rank's blocks: every block of its share of the seeds (all of them unless perturbation-parallel)
        mine = list(range(self.pgroup, zo.q, zo.perturb_parallel))
        blocks, where = local_blocks(zo.estimator, seeds, zo.eps, mine)
        K = n_blocks(zo.estimator, zo.q)
        # sums and counts of every block of the step (zeros where another rank evaluates it): one all-reduce
        sc = torch.zeros(2 * K, dtype=torch.float64)
        if self.read is not None:
            # one forward over the K blocks of the stacked batch; the partition holds theta (the last step's
            # update was applied when it ended)
            faults.crash_point("perturbed", t)  # crash tests: die inside a step (inert otherwise)
            with watch.phase("forward"):
                sums, count = self.read.losses(self.loss_fn, self.forward, [self.to_device(m) for m in micro],
                                               blocks)
            sc[where] = sums
            sc[[K + k for k in where]] = count
        for n_done, k in enumerate(pair_order(blocks) if self.read is None else ()):
            # show block k: (pending update, the first time) + restore + theta + its terms; a block that is the
            # reflection of the one before it (-eps z after +eps z) is a reflection pass (update.py)
            with watch.phase("edit"):
                self.state.transition(self._pending if n_done == 0 else None, list(blocks[k].terms))
            self._pending = None
            if n_done == 0:
                faults.crash_point("perturbed", t)  # crash tests: die holding theta + eps z (inert otherwise)
            with watch.phase("forward"):
                sc[where[k]], sc[K + where[k]] = self._losses(micro)
        if faults.hit("nan", t) or faults.hit("inf", t):  # fault injection (tests): a bad loss on this rank
            sc[where[0]] = math.nan if faults.hit("nan", t) else math.inf
        if not bool(torch.isfinite(sc).all()):
            # only this rank knows its own loss was bad: say which rank, the step is skipped below
            _log.warning("zo_deepspeed: rank %d: non-finite loss at step %d (local block loss sums %s)", self.rank, t,
                         sc[where].tolist())
        sc = self.all_reduce(sc)
        if not bool((sc[K:] > 0).all()):
            raise ValueError("the batch has no loss positions on any rank (all labels are -100?)")
        losses = [float(sc[k] / sc[K + k]) for k in range(K)]
        g = projected_gradients(zo.estimator, losses, zo.eps)
        skipped = not all(math.isfinite(x) for x in g)
        if skipped:
            g = [0.0] * zo.q
        elif zo.max_abs_g > 0:
            g = [max(-zo.max_abs_g, min(zo.max_abs_g, x)) for x in g]
        lp, lm = (losses[0], losses[zo.q]) if zo.estimator == "spsa" else (losses[1], losses[0])
        lr = lr_at(zo.lr, zo.lr_schedule, t, zo.warmup_steps, zo.total_steps)
        terms, decay = (), 0.0
        if skipped:
            self.rule.skip(seeds)
        else:
            terms, decay = self.rule.terms(seeds, g, lr), lr * zo.weight_decay
            if terms or decay:
                self._pending = Update(decay, terms)
        if self.read is not None or not zo.fuse_update:
            with watch.phase("edit"):
                self.flush()  # perturb on read: the update is the step's one pass over the partition
        # g is all-reduced, so every rank takes these branches at the same step: no rank is left behind
        skips = self._skips + 1 if skipped else 0
        if skipped and self.rank == 0:
            _log.warning("zo_deepspeed: step %d skipped on every rank: non-finite loss (L+=%s, L-=%s); "
                         "weights not updated (%d skipped in a row)", t, lp, lm, skips)
        if skipped and 0 < zo.max_consecutive_skips <= skips:
            # the step does not complete: it is neither logged nor counted (a resume runs it again)
            raise RuntimeError(f"stopping: {skips} consecutive steps had a non-finite loss "
                               f"(last: step {t}); check the data and model.dtype, lower zo.lr or zo.eps, "
                               f"or raise zo.max_consecutive_skips (0: never stop)")
        profile = StepProfile(watch.totals.get("forward", 0.0), watch.totals.get("edit", 0.0),
                              self.state.edited - edited, gathered_bytes() if self.parts.zero3 else None,
                              *peak_memory(self.device))
        res = StepResult(t, lp, lm, tuple(g), seeds, lr, skipped, terms, decay, profile, tuple(losses), zo.estimator)
        if self.log is not None:
            self.log.append(StepRecord.from_result(res, eps=zo.eps, weight_decay=zo.weight_decay,
                                                   example_ids=example_ids if example_ids is not None else ()))
        self._step += 1
        self._skips = skips
        return res

    def flush(self) -> None:
        """Apply the pending update and restore: the partitions then hold theta exactly.
        Needed before evaluation, checkpointing or export when fuse_update is on."""
        self.state.transition(self._pending, [])
        self._pending = None

    def replay(self, records: Sequence[StepRecord]) -> None:
        """Apply logged steps to the weights, in order, each exactly as its record says it was applied
        (any rule, schedule or variant), and take up the run's state after the last of them: the
        engine then continues that run. ``records`` are steps ``step_count``, ``step_count`` + 1, ..."""
        self.flush()
        for r in records:
            if r.step != self._step:
                raise ValueError(f"replay: record of step {r.step} where step {self._step} comes next")
            if not r.skipped and (r.update or r.decay):
                self.state.transition(Update(r.decay, tuple(r.update)), [])
            self._step += 1
            self._skips = self._skips + 1 if r.skipped else 0
        self.rule.rebuild(records[-self.zo.momentum_window:])

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything besides the tensors that a resumed run needs (JSON-able)."""
        return {"step": self._step, "consecutive_skips": self._skips,
                "pending": None if self._pending is None else
                {"decay": self._pending.decay, "terms": [list(t) for t in self._pending.terms]},
                "rule": self.rule.state_dict(), "weights": self.state.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Take up a state saved by :meth:`state_dict`. The weights must already be those of that
        state (loaded with :meth:`load_local_tensors`, or rebuilt by :meth:`replay`)."""
        self._step = int(sd["step"])
        self._skips = int(sd["consecutive_skips"])
        p = sd["pending"]
        self._pending = None if p is None else Update(float(p["decay"]), tuple((int(s), float(c)) for s, c in p["terms"]))
        self.rule.load_state_dict(sd["rule"])
        self.state.load_state_dict(sd["weights"])

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """Host copies of this rank's pieces and restore copies, for a checkpoint at this layout."""
        return self.state.local_tensors()

    def load_local_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.state.load_local_tensors(tensors)


def _fill_batch(cfg: dict) -> dict:
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
        return _with_log(ZOEngine(m, zo, None, loss_fn), trajectory)
    import deepspeed

    from .ds_config import load_ds_config, validate_ds_config

    cfg = load_ds_config(config)
    _, size = distributed.setup()  # joins the launcher's process group (plain python: a world of one)
    cfg = _fill_batch(cfg)
    validate_ds_config(cfg, world_size=size)
    _check_precision(cfg)
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
    return _with_log(ZOEngine(ds_engine.module, zo, ds_engine, loss_fn, keepalive), trajectory)


def _check_precision(cfg: dict) -> None:
    """fp16 needs an accelerator that computes in it (DeepSpeed's CPU accelerator only where the CPU has
    fp16 arithmetic): say so before any model is loaded, in one line."""
    if not (cfg.get("fp16") or {}).get("enabled"):
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not acc.is_fp16_supported():
        raise ValueError(f"the ds_config enables fp16, which DeepSpeed's {acc.device_name()} accelerator does not "
                         "support on this machine; use a bf16 config (and model.dtype=bfloat16) or fp32")


def _with_log(engine: ZOEngine, trajectory: str | Path | None) -> ZOEngine:
    if trajectory is not None:
        engine.open_log(trajectory)
    return engine


def replay(model, log: str | Path, config: dict | str | Path | None = None, zo: ZOConfig | None = None,
           adapter: AdapterConfig | None = None, base: str | Path | None = None) -> ZOEngine:
    """Apply a trajectory log to base weights; returns an engine holding the replayed weights, ready to
    continue the run.

    The log is verified first (format, z stream, contiguous steps; with ``base``, the base model's
    folder, that it was recorded on those weights), before any model is built. The restore mode,
    distribution and adapter come from the log header unless ``zo``/``adapter`` are given. Works at
    any world size and layout: ``config`` is the DeepSpeed config (None: a plain module).
    """
    header, records = read_log(log, base=base)
    zo = zo or ZOConfig.from_dict(header.zo)
    adapter = adapter or AdapterConfig.from_dict(header.adapter)
    engine = initialize(adapt(model, adapter), config, zo)
    engine.replay(records)
    return engine
