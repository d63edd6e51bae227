"""Worker for multi-rank tests: N ZO steps of a saved tiny model under a DeepSpeed config.

Launched by tests/conftest.py through the real `deepspeed` launcher (gloo CPU
ranks). Writes losses, g and the gathered final weights (rank 0) so the test
can compare them with a single-process run without DeepSpeed.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import zo_deepspeed as zd
from zo_deepspeed.partitions import gather_state_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    spec = json.load(open(args.spec))
    for sc in spec["scenarios"]:
        run(sc)


def run(sc: dict) -> None:
    zo = zd.ZOConfig(**sc["zo"])
    dtype = getattr(torch, sc.get("dtype", "float32"))
    eng = zd.initialize(lambda: AutoModelForCausalLM.from_pretrained(sc["model_dir"], dtype=dtype),
                        sc["ds_config"], zo, trajectory=sc["out"] + ".traj.jsonl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batches = torch.load(sc["batches"])
    results = []
    for b in batches:
        n = b["input_ids"].shape[0]
        idx = torch.tensor_split(torch.arange(n), world)[rank]
        mine = {k: v[idx] for k, v in b.items()}
        micro = [{k: v[i] for k, v in mine.items()} for i in torch.tensor_split(torch.arange(len(idx)), sc.get("micro", 1))]
        r = eng.step(micro, example_ids=idx.tolist())
        results.append({"loss_plus": r.loss_plus, "loss_minus": r.loss_minus, "g": list(r.g)})
    eng.flush()
    sd = gather_state_dict(eng.module)
    if rank == 0:
        save_file({k: v.float().contiguous() for k, v in sd.items()}, sc["out"] + ".safetensors")
        swapped = sum(1 for _, p in eng.parts.params
                      if getattr(getattr(p, "ds_tensor", None), "final_location", None) is not None)
        json.dump({"steps": results, "kind": eng.parts.kind, "world": world, "nvme_swapped": swapped,
                   "base_bytes": eng.state.base_bytes()}, open(sc["out"] + ".json", "w"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
