"""Memory planner: what a ZO step needs per GPU and per node, and which ds_config to use.

``zo-deepspeed plan --model opt-30b --gpus-per-node 8 --nodes 1 --gpu-mem 80 --cpu-mem 512``

A ZO step is inference forwards plus passes over the local partition, so its
memory is inference memory. ``zo.perturb=partition`` runs 2q forwards of the
batch one after the other, the partition perturbed in place between them;
``zo.perturb=forward`` (the library's default for language models, and the
planner's first choice) runs one forward over K = 2q copies of the batch
stacked along the batch dimension, each module reading theta + c_k z_k for its
block's rows, and never perturbs the partition. Per GPU it is the sum of

* **partition**: the parameters this GPU holds (all of them at ZeRO stage 0,
  1/W at stage 3, none with ``offload_param``), plus the ZeRO++ hpZ secondary
  copy (1/(GPUs per node)) on several nodes, plus the restore copy
  (``zo.restore``: master 4 B/param, backup 2 B/param of the local partition;
  none in forward mode with ``zo.restore=none``) when it lives on the GPU;
* **gathered working set** (stage 3): the full parameters gathered at the
  forward's peak, from a replay of DeepSpeed's fetch / prefetch / release rules
  (``PartitionedParameterCoordinator``: prefetch up to
  ``stage3_prefetch_bucket_size`` elements per module call while fewer than
  ``stage3_max_live_parameters`` are gathered, keep a parameter that is used
  again within ``stage3_max_reuse_distance`` elements) over the model's
  modules in order, with the settings of the proposed ds_config;
* **activations** of one forward under ``no_grad`` (partition mode's forwards
  run one after the other, nothing is kept between them; forward mode's one
  forward is that of a K*B batch up to the logits, then the loss per block):
  see :func:`activations` (``blocks=K``). The logits and the float32 copies the
  loss makes of them are ``8*B*S*vocab`` bytes (12 in fp32) and dominate at long
  sequences (forward mode: the K blocks' stacked logits plus one block's
  copies); the KV cache that HF models build by default (``use_cache``;
  zo_deepspeed's scoring forwards turn it off, ``kv_cache=True`` plans for code
  that does not) is ``2*layers*B*S*kv_dim*b``;
* **read copies** (forward mode): theta + c_k z_k of the module being read, made
  from its gathered parameters on the GPU; the largest is the largest parameter
  (a full vocab x hidden head), and ``CONSTANTS["read_temporaries"]`` of them are
  live at once;
* **buffers**: CUDA context, NCCL, the fused pass's scratch and allocator
  fragmentation (constants below, with the reasons).

Model shapes come from HF ``config.json`` files (``model_configs/`` in this
package for the named models, or a path). The model is built on the meta
device: exact parameter counts and module order, no weights.

GiB (2**30 bytes) throughout; ``--gpu-mem`` / ``--cpu-mem`` are read as GiB
(an "80 GB" A100/H100 has 80 GiB of memory).
"""
from __future__ import annotations

from .cli import add_arguments, format_plan, run
from .memory import CONSTANTS, DS_CONFIG_DIR, DTYPE_BYTES, GiB, MiB, Estimate, Hardware, Layout, estimate
from .planning import Plan, plan, zo_settings
from .shapes import CONFIG_DIR, MODEL_NAMES, ModelShape, activations, gathered_peak, load_model_shape

__all__ = ["MODEL_NAMES", "ModelShape", "load_model_shape", "activations", "gathered_peak", "plan", "Plan",
           "Estimate", "format_plan", "add_arguments", "run", "CONSTANTS", "CONFIG_DIR", "DS_CONFIG_DIR", "GiB",
           "MiB", "DTYPE_BYTES", "Hardware", "Layout", "estimate", "zo_settings"]
