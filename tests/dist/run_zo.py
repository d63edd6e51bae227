"""Worker for multi-rank tests: N ZO steps of a saved tiny model under a DeepSpeed config.

Launched by tests/harness.py (launch_ranks) through the real `deepspeed` launcher (gloo CPU
ranks), and by tests/test_launchers.py and tests/test_slurm.py through launch/. Writes losses,
g and the gathered final weights (rank 0) so the test can compare them with a single-process
run without DeepSpeed.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import zo_deepspeed as zd
from zo_deepspeed.partitions import gather_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import save_weights, step_row, worker_main  # noqa: E402


def run(sc: dict) -> None:
    zo = zd.ZOConfig(**sc["zo"])
    dtype = getattr(torch, sc.get("dtype", "float32"))
    eng = zd.initialize(lambda: AutoModelForCausalLM.from_pretrained(sc["model_dir"], dtype=dtype),
                        sc["ds_config"], zo, trajectory=sc["out"] + ".traj.jsonl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    batches = torch.load(sc["batches"])
    results = []
    d, groups = eng.data_shard  # perturbation-parallel runs: the ranks of a data group share one shard
    for b in batches:
        n = b["input_ids"].shape[0]
        idx = torch.tensor_split(torch.arange(n), groups)[d]
        mine = {k: v[idx] for k, v in b.items()}
        micro = [{k: v[i] for k, v in mine.items()} for i in torch.tensor_split(torch.arange(len(idx)), sc.get("micro", 1))]
        r = eng.step(micro, example_ids=idx.tolist())
        results.append(step_row(r))
    eng.flush()
    sd = gather_state_dict(eng.module)
    if rank == 0:
        save_weights(sd, sc["out"] + ".safetensors")
        swapped = sum(1 for _, p in eng.parts.params
                      if getattr(getattr(p, "ds_tensor", None), "final_location", None) is not None)
        json.dump({"steps": results, "kind": eng.parts.kind, "world": world, "nvme_swapped": swapped,
                   "base_bytes": eng.state.base_bytes(), "local_numel": eng.parts.local_numel(),
                   "perturb": eng.perturb, "restore": eng.state.restore,
                   "read_modules": eng.read.modules if eng.read is not None else []}, open(sc["out"] + ".json", "w"))
    torch.distributed.barrier()


if __name__ == "__main__":
    worker_main(run)
