"""Parameter-efficient ZO: LoRA and prefix tuning through the ``peft`` library.

``adapt(model, cfg)`` wraps a causal LM (or a zero-argument factory building
one) in a ``peft`` model whose only trainable parameters are the adapter's;
every base parameter has ``requires_grad=False``, and :class:`Partitions`
lists trainable parameters only, so the ZO step perturbs and updates the
adapter alone and the base weights stay bit-identical.

Under ZeRO-3 the factory runs under ``HfDeepSpeedConfig`` (see
:func:`zo_deepspeed.initialize`): the base model is partitioned as it loads,
the adapter modules are then created whole on every rank (identically: their
initialisation is a pure function of ``init_seed``), and
``deepspeed.initialize`` converts them into ZeRO-3 parameters (broadcast from
rank 0, then partitioned). From there they are pieces like any other.

Prefix tuning's MeZO initialisation needs a forward of the base model, so it
runs after the DeepSpeed engine exists and before the ZO engine snapshots the
weights: :func:`prepare` (called by ``initialize``) draws ``prefix_tokens``
token ids from the vocabulary with ``init_seed``, runs them through the base
model and copies each layer's keys and values into the prefix.

The chosen config is remembered for the model (:func:`adapter_of`), written into
the trajectory log header, and rebuilt by ``replay`` on the base model before
the log is applied. LoRA's init is a pure function of the seed, so replay is
exact anywhere; the prefix init is a forward, so replay at another world size
or layout reproduces it to float rounding (exactly at the same one).

Export: LoRA is merged into the base weights (``W + alpha/r * B @ A``,
streamed one layer at a time), giving a plain HF folder that
``AutoModelForCausalLM.from_pretrained`` loads, like a full-parameter run's
export, with no peft needed downstream. A prefix cannot be merged into
weights: its export is a peft adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``, a few KB) naming the base model, loadable with
``peft.AutoPeftModelForCausalLM.from_pretrained`` or
``PeftModel.from_pretrained(base, folder)``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch

from .partitions import assign_full, full_shape, is_partitioned, iter_full_params
from .typed import check_fields, choices, section_values

__all__ = ["AdapterConfig", "AdapterMode", "PrefixInit", "ADAPTER_MODES", "MEZO_RECOMMENDED", "adapt", "adapter_of", "prepare",
           "adapter_params", "ExportView", "export_view"]

AdapterMode = Literal["none", "lora", "prefix"]
PrefixInit = Literal["activations", "random"]
ADAPTER_MODES = choices(AdapterMode)

# MeZO's (Malladi et al., 2023) search ranges for OPT: the first lr is the default, the second the alternative.
MEZO_RECOMMENDED = {
    "lora": {"lr": (1e-4, 5e-5), "eps": 1e-2},
    "prefix": {"lr": (1e-2, 1e-3), "eps": 1e-1},
}

# The AdapterConfig of each adapted model, and the models whose prefix prepare() has initialised. Kept
# here, keyed weakly by the model, rather than set as attributes on the nn.Module: adapters.py owns it.
_CONFIGS: "weakref.WeakKeyDictionary[torch.nn.Module, AdapterConfig]" = weakref.WeakKeyDictionary()
_PREPARED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


@dataclass(frozen=True)
class AdapterConfig:
    mode: AdapterMode = "none"
    """Parameter-efficient mode: none (every parameter is trained), lora or prefix. With lora/prefix the run's
    zo.lr and zo.eps default to MeZO's values for the mode (lora: lr 1e-4, alt 5e-5, eps 1e-2; prefix: lr 1e-2,
    alt 1e-3, eps 1e-1) and zo.restore to master (exact, and tiny for an adapter) unless set explicitly."""
    lora_r: int = 8
    """LoRA rank r (MeZO: 8)."""
    lora_alpha: int = 16
    """LoRA scaling numerator: the update is alpha/r * B @ A (MeZO: 16)."""
    lora_targets: str = "q_proj,v_proj"
    """Comma-separated module names that get LoRA (MeZO: the attention query and value projections)."""
    prefix_tokens: int = 5
    """Prefix tuning: virtual tokens whose keys and values are prepended at every layer (MeZO: 5)."""
    prefix_init: PrefixInit = "activations"
    """Prefix initialisation. activations: the keys/values of prefix_tokens random vocabulary tokens run through
    the base model (MeZO). random: standard normal."""
    init_seed: int = 0
    """Seed of the adapter initialisation (LoRA A matrices, the prefix's random tokens or values); LoRA B is 0."""

    def __post_init__(self) -> None:
        check_fields(self, "adapter")  # types and Literal choices; the ranges below
        for k in ("lora_r", "lora_alpha", "prefix_tokens"):
            v = getattr(self, k)
            if v < 1:
                raise ValueError(f"adapter.{k} must be an integer >= 1, got {v!r}")
        if self.init_seed < 0:
            raise ValueError(f"adapter.init_seed must be a non-negative integer, got {self.init_seed!r}")
        if not self.targets():
            raise ValueError(f"adapter.lora_targets={self.lora_targets!r}: give comma-separated module names, "
                             "e.g. q_proj,v_proj")

    def targets(self) -> list[str]:
        return [t.strip() for t in str(self.lora_targets).split(",") if t.strip()]

    def zo_defaults(self) -> dict:
        """The zo settings this mode changes unless they are set explicitly ({} for mode none): MeZO's lr and
        eps, and restore=master. The adapter is a tiny fraction of the model, so a float32 copy of it costs
        nothing and makes the +-eps round trip exact; in place, LoRA's B (starting at 0, eps=1e-2) would drift
        by the rounding of eps*z, relatively large next to its values."""
        rec = MEZO_RECOMMENDED.get(self.mode)
        return {"lr": rec["lr"][0], "eps": rec["eps"], "restore": "master"} if rec else {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "AdapterConfig":
        """From a log header's or an export's ``adapter`` (None: mode none)."""
        return cls(**section_values(cls, d or {}, "adapter", "file"))


# -- building ----------------------------------------------------------------------------------------
def adapter_of(module) -> AdapterConfig | None:
    """The AdapterConfig a model was adapted with (None: not adapted, or mode none)."""
    return _CONFIGS.get(module)


def adapter_params(module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the adapter's parameters: the trainable ones."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def adapt(model, cfg: AdapterConfig):
    """``model`` with ``cfg``'s adapter, base parameters frozen.

    ``model`` is an ``nn.Module``, or a zero-argument factory; a factory gives
    a factory (so that :func:`zo_deepspeed.initialize` still builds it under
    ``HfDeepSpeedConfig`` and ZeRO-3 partitions the base model at load).
    Mode ``none`` returns ``model`` unchanged. The module is changed in place
    (peft injects LoRA layers into it); the returned object is a
    ``peft.PeftModel``.
    """
    if cfg.mode == "none":
        return model
    if callable(model) and not isinstance(model, torch.nn.Module):
        factory = model
        return lambda: adapt(factory(), cfg)
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    if model in _CONFIGS:
        raise ValueError("the model already carries an adapter; pass the base model")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if cfg.mode == "lora":
        pcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=cfg.targets(), lora_dropout=0.0,
                          bias="none", task_type=TaskType.CAUSAL_LM)
    else:
        pcfg = PrefixTuningConfig(num_virtual_tokens=cfg.prefix_tokens, prefix_projection=False,
                                  task_type=TaskType.CAUSAL_LM)
    try:
        # autocast_adapter_dtype=False: the adapter takes the base model's dtype (below), so the ZO state
        # sees one dtype, and 16-bit runs get the same exact-restore handling as full-parameter ones
        peft_model = get_peft_model(model, pcfg, autocast_adapter_dtype=False)
    except ValueError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"adapter.mode={cfg.mode}: peft refused the model ({first[:300]}); for LoRA set "
                         f"adapter.lora_targets to module names the model has (now {cfg.lora_targets})") from None
    params = adapter_params(peft_model)
    if not params:
        raise ValueError(f"adapter.mode={cfg.mode} added no trainable parameter to the model")
    for n, p in params:
        if not is_partitioned(p) and p.dtype != dtype:
            p.data = p.data.to(dtype)  # peft builds the prefix in float32 whatever the base dtype
        assign_full(p, _initial_value(n, p, cfg))
    _CONFIGS[peft_model] = cfg
    return peft_model


def _generator(seed: int, name: str) -> torch.Generator:
    # one stream per (seed, parameter name): independent of creation order and of the rank
    return torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode()))


def _initial_value(name: str, p, cfg: AdapterConfig) -> torch.Tensor:
    shape = full_shape(p)
    g = _generator(cfg.init_seed, name)
    if ".lora_B." in name:
        return torch.zeros(shape)
    if ".lora_A." in name:
        # peft's (and nn.Linear's) default: kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        w = torch.empty(shape)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)
        return w
    # the prefix before prepare(): N(0, 1) like nn.Embedding (the final value when prefix_init=random)
    return torch.randn(shape, generator=g)


@torch.no_grad()
def prepare(module, device: torch.device | str | None = None) -> None:
    """Data-dependent initialisation, after the DeepSpeed engine exists and before the ZO state is built.

    A no-op except for prefix tuning with ``prefix_init=activations`` (MeZO):
    ``prefix_tokens`` token ids drawn with ``init_seed`` from the vocabulary are
    run through the base model, and each layer's keys and values become the
    prefix. Collective under ZeRO-3 (a forward); runs once per module.
    ``device``: where the forward's inputs go (the DeepSpeed engine's device; default: the parameters').
    """
    cfg = adapter_of(module)
    if cfg is None or cfg.mode != "prefix" or cfg.prefix_init != "activations" or module in _PREPARED:
        return
    base = module.get_base_model()
    pcfg = module.active_peft_config
    vocab = int(base.config.get_text_config().vocab_size)
    g = torch.Generator().manual_seed(cfg.init_seed)
    tokens = torch.randint(0, vocab, (1, cfg.prefix_tokens), generator=g)
    device = device if device is not None else next(iter(module.parameters())).device
    was_training = module.training
    module.eval()
    out = base(input_ids=tokens.to(device), attention_mask=torch.ones_like(tokens).to(device), use_cache=True)
    module.train(was_training)
    cache = out.past_key_values
    layers = []
    for i in range(pcfg.num_layers):
        k, v = (cache.layers[i].keys, cache.layers[i].values) if hasattr(cache, "layers") else cache[i][:2]
        layers.append(torch.stack([k[0], v[0]]))  # (2, heads, tokens, head_dim)
    kv = torch.stack(layers)  # (layers, 2, heads, tokens, head_dim)
    heads, head_dim = pcfg.num_attention_heads, pcfg.token_dim // pcfg.num_attention_heads
    if tuple(kv.shape[2:]) != (heads, cfg.prefix_tokens, head_dim):
        raise ValueError(f"prefix tuning: the model's cached keys have shape {tuple(kv.shape[2:])}, the prefix "
                         f"expects (heads, tokens, head_dim) = {(heads, cfg.prefix_tokens, head_dim)}; use "
                         "adapter.prefix_init=random for this architecture")
    # peft reads the prefix as weight.view(tokens, layers * 2, heads, head_dim), layer l's keys at 2l, values at 2l+1
    value = kv.permute(3, 0, 1, 2, 4).reshape(cfg.prefix_tokens, -1)
    (name, p), = adapter_params(module)
    assign_full(p, value.float())
    _PREPARED.add(module)


# -- export ----------------------------------------------------------------------------------------------
@dataclass
class ExportView:
    """What an export of an adapted model writes: (name, full tensor) pairs streamed (collective), the
    weights file stem, and a writer for the folder's config files (rank 0)."""

    params: Iterator[tuple[str, torch.Tensor]]
    stem: str
    write_config: Callable[[Path], None]


def export_view(module) -> ExportView | None:
    """None for a model without adapter (the plain export applies)."""
    cfg = adapter_of(module)
    if cfg is None:
        return None
    base = module.get_base_model()

    def write_base_config(folder: Path) -> None:
        base.config.save_pretrained(folder)
        gen = getattr(base, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(folder)
            except Exception:  # noqa: BLE001 - an invalid generation config must not sink the export
                pass

    if cfg.mode == "lora":
        return ExportView(_merged_lora(base, cfg.lora_alpha / cfg.lora_r), "model", write_base_config)

    def write_adapter_config(folder: Path) -> None:
        pc = copy.deepcopy(module.active_peft_config)
        pc.inference_mode = True  # what PeftModel.save_pretrained writes
        pc.save_pretrained(str(folder))
        (folder / "zo_adapter.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    return ExportView(_prefix_params(module), "adapter_model", write_adapter_config)


def _prefix_params(module) -> Iterator[tuple[str, torch.Tensor]]:
    # peft's saved name for a prefix (what PeftModel.from_pretrained reads back)
    for _, t in iter_full_params(module.prompt_encoder):
        yield "prompt_embeddings", t


def _merged_lora(base, scale: float) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's parameters under their original names, LoRA layers merged: W + scale * B @ A.
    Streams like iter_full_params (collective); holds at most one layer's base weight and factors."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in iter_full_params(base):
        for part, tag in ((".base_layer.", "W"), (".lora_A.", "A"), (".lora_B.", "B")):
            if part in name:
                owner, rest = name.split(part, 1)
                if tag == "W" and rest != "weight":
                    yield f"{owner}.{rest}", t  # the wrapped layer's bias: unchanged
                    break
                slot = pending.setdefault(owner, {})
                slot[tag] = t
                if len(slot) == 3:
                    del pending[owner]
                    w = slot["W"]
                    merged = w.float() + scale * (slot["B"].float() @ slot["A"].float())
                    yield f"{owner}.weight", merged.to(w.dtype)
                break
        else:
            yield name, t
    if pending:  # only reachable on rank 0 (other ranks receive no tensors): a layout peft did not produce
        raise RuntimeError(f"LoRA export: incomplete layers {sorted(pending)[:3]}")
