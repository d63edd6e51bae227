"""Run setup: everything between a config tree and a ZO engine ready to step.

Every check here only reads, so a refused run writes nothing: the process group, the task and its
splits, the model folder and its tokenizer, and the ds_config. :class:`RunLock` is the first write of a
training run. Used by the trainer and by the CLI's eval, export and replay alike.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .modelcheck import check_model_files
from .run_config import DEFAULT_DS_CONFIG, DEFAULT_DS_CONFIG_ONE_RANK, RunConfig

__all__ = ["RunSetup", "prepare_run", "build_engine", "build_ds_config", "load_tokenizer", "resolve_model_path",
           "check_model_files", "check_writable", "RunLock"]


def resolve_model_path(path: str, key: str = "model.path") -> str:
    if path == "default":
        from .models import ensure_default_model

        return str(ensure_default_model())
    from .guard import is_run_dir, show_setting

    p = Path(path)
    at = show_setting(key, path)
    if is_run_dir(p):
        fix = (f"its trained model is {p / 'export'}: pass {key}={p / 'export'}"
               if (p / "export" / "config.json").exists()
               else f"write its model first: zo-deepspeed export --run-dir {path} --out DIR")
        raise FileNotFoundError(f"{at} is a zo-deepspeed run directory, not a model folder; {fix}")
    if not p.is_dir() or not (p / "config.json").exists():
        what = "is a file" if p.is_file() else "does not exist" if not p.exists() else "has no config.json"
        raise FileNotFoundError(f"{at} is not an HF model folder ({what}); pass a local folder with "
                                "config.json and weights, or 'default'")
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
    from .tasks.protocol import model_context

    ctx = model_context(mc)
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


def default_ds_config(world: int) -> tuple[dict, str]:
    """The embedded ds_config for a run given none, and why it is that one (printed at start)."""
    if world == 1:
        return (json.loads(json.dumps(DEFAULT_DS_CONFIG_ONE_RANK)),
                "a replica (ZeRO stage 0): one rank holds the whole model either way, and ZeRO-3 would only "
                "add its gather hooks to every module call; pass --ds-config for another layout")
    return (json.loads(json.dumps(DEFAULT_DS_CONFIG)),
            f"ZeRO-3: each of the {world} ranks holds 1/{world} of every parameter; pass --ds-config for offload "
            "or hpZ (ds_configs/)")


def build_ds_config(cfg: RunConfig, world: int, run_dir: Path | None) -> dict:
    """The ds_config for this run: the user's file (or the embedded default) with "auto" filled in;
    with ``run_dir``, DeepSpeed's CSV (and TensorBoard, when installed) monitors write into it."""
    from .ds_config import fill_auto, load_ds_config, validate_ds_config

    ds = load_ds_config(cfg.deepspeed) if cfg.deepspeed else default_ds_config(world)[0]
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
    if run_dir is not None and "comms_logger" not in ds:
        # the step profile's gathered bytes (profile.py). DeepSpeed then synchronises after each collective:
        # free on the CPU, a cost on GPUs that overlap prefetch with compute; a ds_config with its own
        # "comms_logger" block (enabled: false) turns it off
        ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
    if run_dir is not None and "csv_monitor" not in ds:
        ds["csv_monitor"] = {"enabled": True, "output_path": str(run_dir / "monitor"), "job_name": "csv"}
        try:
            import tensorboard  # noqa: F401  (DeepSpeed's TensorBoard monitor needs it)

            ds.setdefault("tensorboard", {"enabled": True, "output_path": str(run_dir / "monitor"),
                                          "job_name": "tensorboard"})
        except ImportError:
            pass
    return ds


class RunLock:
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


@dataclass(frozen=True)
class RunSetup:
    """What a run reads before it builds its engine."""

    cfg: RunConfig         # resolved (run_config.resolve_run_config): no "auto" left
    rank: int
    world: int
    task: object           # tasks.Task
    splits: dict           # split name -> list[Example]
    model_path: str        # the resolved folder ('default' converted)
    tokenizer: object
    ds_config: dict

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def prepare_run(cfg: RunConfig, run_dir: Path | None = None, splits: tuple[str, ...] = ("train", "dev", "test")
                ) -> RunSetup:
    """Join the process group and read and check everything the run needs; the setup holds the
    resolved config. ``run_dir``: a training run's directory (DeepSpeed's monitors are pointed into it);
    None for eval/export/replay. ``splits`` ("test",): only the test split is read (eval), so its train and
    dev files need not exist; (): no data at all (export); the splits not read are empty."""
    from .run_config import resolve_run_config
    from .tasks import build_splits
    from .tasks.protocol import configured_task, fit_max_length

    auto_length = cfg.data.max_length is None  # MeZO's 2048, at most the model's context (tasks/protocol.py)
    cfg = resolve_run_config(cfg)  # objective, data.* (the task's) and zo.total_steps filled in
    rank, world = distributed.setup()
    task = configured_task(cfg.data)
    if not splits:  # export: the model and its tokenizer only
        splits = {"train": [], "dev": [], "test": []}
    elif tuple(splits) == ("test",):
        from .tasks.sampling import sample_examples

        # the test part of build_splits (its test_seed and the task's sampler), without reading train/dev
        test = sample_examples(task.load_split(task.test_source, cfg.data.data_dir), cfg.data.num_test,
                               cfg.data.test_seed, task.sampler)
        splits = {"train": [], "dev": [], "test": test}
    else:
        splits = build_splits(task, cfg.data.data_dir, seed=cfg.zo.seed, num_train=cfg.data.num_train,
                              num_dev=cfg.data.num_dev, num_test=cfg.data.num_test,
                              k_per_class=cfg.data.k_per_class or None, test_seed=cfg.data.test_seed)
    model_path = resolve_model_path(cfg.model.path)
    check_model_files(model_path)  # config.json and the weights' names and shapes agree, before any load
    tokenizer = load_tokenizer(model_path)
    if auto_length:
        cfg = fit_max_length(cfg, model_path, verbose=rank == 0)
    check_model_inputs(model_path, tokenizer, cfg.data.max_length)
    ds_config = build_ds_config(cfg, world, run_dir)
    if rank == 0:
        layout = default_ds_config(world)[1] if cfg.deepspeed is None else f"the ds_config {cfg.deepspeed}"
        print(f"[zo_deepspeed] layout: {layout}; perturbation: zo.perturb={cfg.zo.resolved_perturb()}", flush=True)
    return RunSetup(cfg, rank, world, task, splits, model_path, tokenizer, ds_config)


def build_engine(setup: RunSetup, loss_fn=None):
    """The ZO engine on the run's base model (partitioned as it loads under ZeRO-3); with adapter.mode
    lora/prefix only the adapter is trained."""
    from transformers import AutoModelForCausalLM

    from .adapters import adapt
    from .console import hf_progress_bars_off
    from .engine import initialize

    cfg = setup.cfg
    dtype = getattr(torch, cfg.model.dtype)
    with hf_progress_bars_off():
        return initialize(adapt(lambda: AutoModelForCausalLM.from_pretrained(setup.model_path, dtype=dtype),
                                cfg.adapter), setup.ds_config, cfg.zo, loss_fn=loss_fn)
