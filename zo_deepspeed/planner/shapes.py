"""Model shapes from HF configs (built on the meta device), the activations of one forward, and the
ZeRO-3 gathered working set: what a model needs, independent of where it runs."""
from __future__ import annotations

import functools
import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CONFIG_DIR", "MODEL_NAMES", "ModelShape", "load_model_shape", "activations", "gathered_peak"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
MODEL_NAMES = ("opt-1.3b", "opt-13b", "opt-30b", "opt-66b", "llama-7b", "llama-13b", "llama-30b", "llama-65b")


# ---------------------------------------------------------------------------- model shapes
@dataclass
class ModelShape:
    name: str
    model_type: str
    architecture: str
    n_params: int            # unique parameters (a tied embedding once)
    layers: int
    hidden: int
    heads: int
    kv_dim: int              # kv_heads * head_dim
    ffn: int
    vocab: int
    gated_mlp: bool          # Llama-style gate/up/down (3 ffn-sized tensors live) vs fc1/act/fc2
    rotary: bool
    max_positions: int | None
    tied_embeddings: bool
    largest_param: int
    param_numel: list[int] = field(repr=False)           # per unique parameter
    module_params: list[list[int]] = field(repr=False)   # per module in forward order: its own parameters


def _first_attr(cfg, names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _read_config(model: str) -> tuple[str, dict]:
    if model in MODEL_NAMES:
        path = CONFIG_DIR / f"{model}.json"
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODEL_NAMES)} "
                             f"or a path to an HF config.json (or its folder)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path} has no \"model_type\"; pass an HF config.json of a causal LM")
    name = model if model in MODEL_NAMES else str(path)
    return name, raw


@functools.lru_cache(maxsize=32)
def load_model_shape(model: str) -> ModelShape:
    """Shape of a named model (``MODEL_NAMES``) or of an HF config.json, built on the meta device."""
    name, raw = _read_config(model)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(raw)
    mtype = raw.pop("model_type")
    try:
        cfg = AutoConfig.for_model(mtype, **raw)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{name}: transformers cannot read model_type {mtype!r} ({str(e).splitlines()[0]})") from None
    try:
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001  (any construction failure is a bad config for the planner)
        raise ValueError(f"{name}: cannot build a causal LM from this config "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    ids: dict[int, int] = {}
    numel: list[int] = []
    for p in m.parameters():  # unique parameters, in registration order
        ids[id(p)] = len(numel)
        numel.append(p.numel())
    # DeepSpeed hooks every module and fetches its own (recurse=False) parameters; pre-order module
    # order is the forward order for decoder-only LMs up to the placement of small norms
    mods = [[ids[id(p)] for p in mod.parameters(recurse=False)] for _, mod in m.named_modules()]
    hidden = _first_attr(cfg, ("hidden_size", "n_embd", "d_model"))
    layers = _first_attr(cfg, ("num_hidden_layers", "n_layer", "num_layers"))
    heads = _first_attr(cfg, ("num_attention_heads", "n_head"))
    ffn = _first_attr(cfg, ("intermediate_size", "ffn_dim", "n_inner"), None)
    if None in (hidden, layers, heads):
        raise ValueError(f"{name}: config lacks hidden_size / num_hidden_layers / num_attention_heads")
    ffn = ffn or 4 * hidden
    kv_heads = _first_attr(cfg, ("num_key_value_heads",), heads)
    head_dim = _first_attr(cfg, ("head_dim",), hidden // heads)
    names = [n for n, _ in m.named_modules()]
    gated = any(n.endswith("gate_proj") for n in names)
    rotary = any("rotary" in n for n in names) or getattr(cfg, "rope_theta", None) is not None
    tied = any(p is m.get_input_embeddings().weight for p in m.get_output_embeddings().parameters()) \
        if m.get_output_embeddings() is not None else False
    return ModelShape(name=name, model_type=mtype, architecture=type(m).__name__, n_params=sum(numel),
                      layers=int(layers), hidden=int(hidden), heads=int(heads), kv_dim=int(kv_heads * head_dim),
                      ffn=int(ffn), vocab=int(cfg.vocab_size), gated_mlp=gated, rotary=rotary,
                      max_positions=getattr(cfg, "max_position_embeddings", None), tied_embeddings=tied,
                      largest_param=max(numel), param_numel=numel, module_params=mods)


# ---------------------------------------------------------------------------- activations
def activations(shape: ModelShape, batch: int, seq: int, b: int, *, attention: str = "sdpa",
                kv_cache: bool = False, loss: str = "library", blocks: int = 1) -> dict:
    """Peak bytes live during one no_grad forward + loss, and its parts (all in bytes).

    ``blocks`` = K > 1 is ``zo.perturb=forward``'s forward: K copies of the ``batch`` stacked along the
    batch dimension (K = 2q), so everything up to the logits is that of a K*batch forward (T below is
    then the stacked forward's tokens, K*batch*seq), except

    * the head: each wrapped module computes its K blocks' outputs one after the other and concatenates
      them, so the output head holds the K blocks' logits and their concatenation at once,
      ``2*T*vocab*b`` (the same happens in every linear layer, where it is no larger than the
      block the layer phase counts already);
    * the loss runs once per block on that block's rows (a view of the stacked logits), so the stacked
      logits ``T*vocab*b`` stay alive under one block's loss temporaries (the float32 copy and the
      log-softmax of ``batch`` rows), not K blocks' worth.

    What is live (HF decoder-only LM, eval mode, no_grad: a tensor dies when its last reference goes):

    * the residual stream: the layer's input and its sum with the block output, ``2*T*h*b``
      (T = batch*seq tokens, b = bytes per element of the model dtype);
    * the attention mask: ``B*S*S`` bool (sdpa) or in the model dtype (eager); with ``eager`` also the
      scores, their float32 softmax and its cast back, ``B*heads*S*S*(2b+4)`` (sdpa's fused kernels
      on GPU never hold them);
    * inside a layer, the larger of the attention block (norm output, q, k, v, rotary outputs,
      attention output and its merged copy) and the MLP block (fc1/act/fc2 models: fc1 output + its
      activation, ``2*T*ffn*b``; gated models: norm output + act(gate) + up + their product,
      ``T*(h + 3*ffn)*b``);
    * the KV cache HF builds when ``config.use_cache`` (the default): every layer's k and v,
      ``2*layers*T*kv_dim*b``, alive until the model returns;
    * the head: final norm output and the logits ``T*vocab*b`` while the cache is still alive;
    * the loss, after the model's output (and its cache) is dropped: the library's ``causal_lm_loss``
      holds a float32 copy of the logits and cross_entropy's float32 log-softmax, ``8*T*vocab``
      (16-bit: the 16-bit logits die when the copy replaces them; float32: ``.float()`` is a view, so the
      logits stay and ``reshape`` copies them when batch > 1: ``12*T*vocab``). ``loss="chunked"``:
      the logits plus 256 rows of float32 at a time.
    """
    if attention not in ("sdpa", "eager"):
        raise ValueError(f"attention={attention!r}; use sdpa or eager")
    if not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks={blocks!r}; use an integer >= 1 (K = 2q for zo.perturb=forward)")
    K = blocks
    Tb = batch * seq            # tokens of one block (the batch one loss call sees)
    batch = K * batch           # the stacked forward
    T = batch * seq
    h, kv, f, V, L = shape.hidden, shape.kv_dim, shape.ffn, shape.vocab, shape.layers
    mask = batch * seq * seq * (1 if attention == "sdpa" else b)
    scores = batch * shape.heads * seq * seq * (2 * b + 4) if attention == "eager" else 0
    resid = 2 * T * h * b
    attn = T * b * (h + h + 2 * kv + h + h) + (T * b * 2 * (h + kv) if shape.rotary else 0) + scores
    mlp = T * b * (h + 3 * f) if shape.gated_mlp else T * b * 2 * f
    layer = max(attn, mlp)
    cache = 2 * L * T * kv * b if kv_cache else 0
    logits = T * V * b
    bb = batch // K             # rows of one block
    if loss == "library":
        # logits[:, :-1].float(): a new float32 tensor for 16-bit logits (the 16-bit ones die when the name is
        # rebound, unless other blocks' views keep the stacked tensor alive), a view of float32 ones that
        # reshape() then copies when a block has more than one row; plus log_softmax
        temps = Tb * V * (8 if b < 4 or bb > 1 else 4)
        keeps_logits = K > 1 or b == 4   # the logits stay alive under the loss temporaries
    elif loss == "chunked":
        temps, keeps_logits = 2 * 256 * V * 4, True
    else:
        raise ValueError(f"loss={loss!r}; use library or chunked")
    loss_b = temps + (logits if keeps_logits else 0)
    phases = {
        "layers": mask + resid + cache + layer,   # at the last layer (the cache is largest there)
        # K > 1: the head's K block outputs and their concatenation
        "head": mask + resid + cache + T * h * b + logits * (2 if K > 1 else 1),
        "loss": loss_b,
    }
    phase = max(phases, key=phases.get)
    return {"peak": phases[phase], "phase": phase, "phases": phases, "kv_cache": cache, "logits": logits,
            "loss": loss_b, "layer": layer, "residual": resid, "mask": mask, "scores": scores, "tokens": T,
            "blocks": K}


# ---------------------------------------------------------------------------- ZeRO-3 gathers
_GATHER_CACHE: dict[tuple, int] = {}


def gathered_peak(shape: ModelShape, prefetch_bucket: int, max_live: int, max_reuse: int) -> int:
    """Most parameter elements gathered at once during a steady-state ZeRO-3 forward.

    A replay of DeepSpeed's PartitionedParameterCoordinator on the module trace: each module's
    forward pre-hook fetches its own parameters, then prefetches parameters of the following modules
    until ``min(prefetch_bucket, max_live - gathered)`` elements were started (the parameter that
    crosses the limit is still fetched); after the module, its parameters are released unless they
    were prefetched for a later use or are used again within ``max_reuse`` elements of the trace.
    """
    key = (shape.name, shape.n_params, len(shape.module_params), prefetch_bucket, max_live, max_reuse)
    if key not in _GATHER_CACHE:
        _GATHER_CACHE[key] = _replay_gathers(shape, prefetch_bucket, max_live, max_reuse)
    return _GATHER_CACHE[key]


def _replay_gathers(shape: ModelShape, prefetch_bucket: int, max_live: int, max_reuse: int) -> int:
    mods = shape.module_params
    numel = shape.param_numel
    queue = deque((pid, i) for i, ps in enumerate(mods) for pid in sorted(set(ps)))
    avail: set[int] = set()
    fetched_for: dict[int, int] = {}
    n_avail = peak = 0
    for i, ps in enumerate(mods):
        for pid in ps:
            fetched_for[pid] = max(fetched_for.get(pid, -1), i)
            if pid not in avail:
                avail.add(pid)
                n_avail += numel[pid]
        while queue and queue[0][1] <= i:
            queue.popleft()
        budget = min(prefetch_bucket, max_live - n_avail)
        started = 0
        while prefetch_bucket > 0 and queue and started < budget:
            pid, step = queue.popleft()
            fetched_for[pid] = max(fetched_for.get(pid, -1), step)
            if pid not in avail:
                avail.add(pid)
                n_avail += numel[pid]
                started += numel[pid]
        peak = max(peak, n_avail)
        step_id = i + 1
        for pid in set(ps):
            if fetched_for.get(pid, -1) > step_id:
                continue
            traversed, reused = 0, False
            for j in range(step_id, len(mods)):
                if traversed >= max_reuse:
                    break
                if pid in mods[j]:
                    reused = True
                    break
                traversed += sum(numel[q] for q in mods[j])
            if not reused and pid in avail:
                avail.discard(pid)
                n_avail -= numel[pid]
    return peak
