"""Worker for the LoRA / prefix multi-rank tests: N ZO steps of an adapted tiny model under a DeepSpeed config.

Launched through the real `deepspeed` launcher (gloo CPU ranks) by tests/test_adapters.py. Writes, per
scenario: losses and g, every gathered parameter (rank 0), the names of the parameters the ZO state edits,
the trajectory log, and an export folder.
"""
import argparse
import json

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import zo_deepspeed as zd
from zo_deepspeed.adapters import AdapterConfig, adapt
from zo_deepspeed.checkpoint import export_hf
from zo_deepspeed.partitions import gather_state_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    for sc in json.load(open(args.spec))["scenarios"]:
        run(sc)


def run(sc: dict) -> None:
    factory = adapt(lambda: AutoModelForCausalLM.from_pretrained(sc["model_dir"]), AdapterConfig(**sc["adapter"]))
    eng = zd.initialize(factory, sc["ds_config"], zd.ZOConfig(**sc["zo"]), trajectory=sc["out"] + ".traj.jsonl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = []
    for b in torch.load(sc["batches"]):
        idx = torch.tensor_split(torch.arange(b["input_ids"].shape[0]), world)[rank]
        r = eng.step({k: v[idx] for k, v in b.items()}, example_ids=idx.tolist())
        results.append({"loss_plus": r.loss_plus, "loss_minus": r.loss_minus, "g": list(r.g)})
    eng.flush()
    sd = gather_state_dict(eng.module)
    export_hf(eng, sc["out"] + ".export")
    if rank == 0:
        save_file({k: v.float().contiguous() for k, v in sd.items()}, sc["out"] + ".safetensors")
        json.dump({"steps": results, "kind": eng.parts.kind, "world": world,
                   "edited": [n for n, _ in eng.parts.params],
                   "partitioned": [n for n, p in eng.parts.params if hasattr(p, "ds_tensor")]},
                  open(sc["out"] + ".json", "w"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
