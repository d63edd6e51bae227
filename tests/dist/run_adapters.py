"""Worker for the LoRA / prefix multi-rank tests: N ZO steps of an adapted tiny model under a DeepSpeed config.

Launched through the real `deepspeed` launcher (gloo CPU ranks) by tests/test_adapters.py. Writes, per
scenario: losses and g, every gathered parameter (rank 0), the names of the parameters the ZO state edits,
the trajectory log, and an export folder.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import zo_deepspeed as zd
from zo_deepspeed.adapters import AdapterConfig, adapt
from zo_deepspeed.checkpoint import export_hf
from zo_deepspeed.partitions import gather_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import save_weights, step_row, worker_main  # noqa: E402


def run(sc: dict) -> None:
    factory = adapt(lambda: AutoModelForCausalLM.from_pretrained(sc["model_dir"]), AdapterConfig(**sc["adapter"]))
    eng = zd.initialize(factory, sc["ds_config"], zd.ZOConfig(**sc["zo"]), trajectory=sc["out"] + ".traj.jsonl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = []
    for b in torch.load(sc["batches"]):
        idx = torch.tensor_split(torch.arange(b["input_ids"].shape[0]), world)[rank]
        r = eng.step({k: v[idx] for k, v in b.items()}, example_ids=idx.tolist())
        results.append(step_row(r))
    eng.flush()
    sd = gather_state_dict(eng.module)
    export_hf(eng, sc["out"] + ".export")
    if rank == 0:
        save_weights(sd, sc["out"] + ".safetensors")
        json.dump({"steps": results, "kind": eng.parts.kind, "world": world,
                   "edited": [n for n, _ in eng.parts.params],
                   "partitioned": [n for n, p in eng.parts.params if hasattr(p, "ds_tensor")]},
                  open(sc["out"] + ".json", "w"))
    torch.distributed.barrier()


if __name__ == "__main__":
    worker_main(run)
