"""launch/: shellcheck, the commands each script prints (DRY_RUN=1), and real runs.

The real runs drive the scripts with ENTRY=tests/dist/run_zo.py (the same
worker as tests/test_distributed.py): the deepspeed single-node script, plain
torchrun and `accelerate launch` must give the same trajectory and weights,
and those must equal one process without DeepSpeed. The SLURM script runs for
real in tests/test_slurm.py.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import (DIST, REPO, ZO_EAGER, compare, filled_ds, free_port, read_trajectory, reference, repo_env,
                     save_batches, scenario, tail, worker_weights, write_spec)

LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
RUN_ZO = str(DIST / "run_zo.py")


def _shellcheck() -> str:
    exe = shutil.which("shellcheck")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(["apt-get", "install", "-y", "-qq", "shellcheck"], env=env, capture_output=True).returncode:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "shellcheck"], env=env, capture_output=True)
        exe = shutil.which("shellcheck")
    assert exe, "shellcheck is not installed and could not be installed; run launch/install.sh (apt-get install shellcheck)"
    return exe


def test_shellcheck_clean():
    assert {p.name for p in SCRIPTS} >= {"single_node.sh", "multi_node.sh", "slurm.sbatch", "accelerate.sh"}
    p = subprocess.run([_shellcheck(), "--shell=bash", "--severity=style", "--external-sources",
                        *map(str, SCRIPTS)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    for s in SCRIPTS:
        text = s.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), s.name
        assert "\nset -euo pipefail\n" in text, s.name


def dry(script: str, *args: str, cwd: Path = REPO, **env) -> list[list[str]]:
    """Run a script with DRY_RUN=1 and return the commands it printed (lines starting '+'), split like a shell.
    DEEPSPEED/ACCELERATE point at a missing program: the test fails if the script runs anything."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    e.update(DRY_RUN="1", DEEPSPEED=env.pop("DEEPSPEED", "/nonexistent/deepspeed"),
             ACCELERATE=env.pop("ACCELERATE", "/nonexistent/accelerate"), **env)
    p = subprocess.run(["bash", str(LAUNCH / script), *args], env=e, cwd=cwd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return [shlex.split(line[1:]) for line in p.stdout.splitlines() if line.startswith("+")]


def test_single_node_dry_run():
    (cmd,) = dry("single_node.sh", "--ds-config", "ds_configs/zero3.json", "train.steps=5", GPUS="4",
                 MASTER_PORT="29999")
    assert cmd == ["/nonexistent/deepspeed", "--num_gpus", "4", "--master_port", "29999", "--no_local_rank",
                   "--module", "zo_deepspeed", "train", "--ds-config", "ds_configs/zero3.json", "train.steps=5"]
    (cmd,) = dry("single_node.sh", "--spec", "a b.json", GPUS="2", ENTRY=RUN_ZO, DS_ARGS="--bind_cores_to_rank",
                 DEEPSPEED="python -m deepspeed.launcher.runner")
    assert cmd == ["python", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29500",
                   "--no_local_rank", "--bind_cores_to_rank", RUN_ZO, "--spec", "a b.json"]


def test_multi_node_dry_run(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8\n")
    (cmd,) = dry("multi_node.sh", "--ds-config", "ds_configs/zero3_hpz_bf16.json", HOSTFILE=str(hf))
    assert cmd == ["/nonexistent/deepspeed", "--hostfile", str(hf), "--master_addr", "worker-1", "--master_port",
                   "29500", "--launcher", "pdsh", "--no_local_rank", "--module", "zo_deepspeed", "train",
                   "--ds-config", "ds_configs/zero3_hpz_bf16.json"]
    (cmd,) = dry("multi_node.sh", "x=1", HOSTFILE=str(hf), NODE_RANK="1", MASTER_ADDR="10.0.0.1", GPUS="4",
                 NNODES="2", ENTRY=RUN_ZO)
    assert cmd == ["/nonexistent/deepspeed", "--hostfile", str(hf), "--master_addr", "10.0.0.1", "--master_port",
                   "29500", "--no_ssh", "--node_rank", "1", "--num_gpus", "4", "--num_nodes", "2", "--no_local_rank",
                   RUN_ZO, "x=1"]
    e = dict(os.environ, DRY_RUN="1", HOSTFILE=str(tmp_path / "missing"))
    p = subprocess.run(["bash", str(LAUNCH / "multi_node.sh")], env=e, capture_output=True, text=True)
    assert p.returncode == 2 and "hostfile" in p.stderr and "not found" in p.stderr


def test_slurm_dry_run():
    text = (LAUNCH / "slurm.sbatch").read_text()
    for d in ("--signal=B:TERM@120", "--requeue", "--ntasks-per-node=1", "--open-mode=append"):
        assert f"#SBATCH {d}" in text
    cmds = dry("slurm.sbatch", "--ds-config", "ds_configs/zero3.json", "train.output_dir=runs/x", NNODES="3",
               GPUS_PER_NODE="4", MASTER_PORT="29511")
    srun, *nodes = cmds
    i = srun.index("bash")
    assert srun[:i] == ["srun", "--nodes", "3", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    launch_args = ["--master_addr", "node1", "--master_port", "29511", "--no_local_rank", "--module", "zo_deepspeed",
                   "train", "--ds-config", "ds_configs/zero3.json", "train.output_dir=runs/x"]
    assert srun[i:] == ["bash", "-c", 'node_main "$@"', "node_main", *launch_args]
    assert len(nodes) == 3
    for k, cmd in enumerate(nodes):
        assert cmd[:4] == ["[node", str(k), f"node{k + 1}]", "/nonexistent/deepspeed"]
        assert cmd[4:] == ["--hostfile", "HOSTFILE", "--no_ssh", "--node_rank", str(k), *launch_args]
    # a requeued job resumes: --resume goes right after the sub-command
    srun, *_ = dry("slurm.sbatch", "train.steps=9", SLURM_RESTART_COUNT="1")
    assert srun[srun.index("train"):] == ["train", "--resume", "train.steps=9"]
    srun, *_ = dry("slurm.sbatch", "--spec", "s.json", SLURM_RESTART_COUNT="1", RESUME_ARGS="none", ENTRY=RUN_ZO)
    assert srun[srun.index(RUN_ZO):] == [RUN_ZO, "--spec", "s.json"]
    # outside an allocation, without DRY_RUN: a clear refusal
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    p = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], env=e, capture_output=True, text=True)
    assert p.returncode == 2 and "submit it with sbatch" in p.stderr


def test_accelerate_dry_run_and_config():
    import yaml

    (cmd,) = dry("accelerate.sh", "--ds-config", "ds_configs/zero3_bf16.json", GPUS="8", MASTER_PORT="29600")
    assert cmd == ["/nonexistent/accelerate", "launch", "--config_file", str(LAUNCH / "accelerate_zero3.yaml"),
                   "--main_process_port", "29600", "--num_processes", "8", "--module", "zo_deepspeed", "train",
                   "--ds-config", "ds_configs/zero3_bf16.json"]
    cfg = yaml.safe_load((LAUNCH / "accelerate_zero3.yaml").read_text())
    assert cfg["distributed_type"] == "DEEPSPEED" and cfg["deepspeed_config"]["zero3_init_flag"] is True
    assert (REPO / cfg["deepspeed_config"]["deepspeed_config_file"]).exists()


# -- real runs ---------------------------------------------------------------------------------

def _records(path: Path) -> list:
    return read_trajectory(path)[1]


@pytest.mark.dist
def test_single_node_script_torchrun_and_accelerate_agree(model_dirs, tmp_path):
    from zo_deepspeed.ds_config import validate_ds_config

    llama = model_dirs["llama"]
    batches = save_batches(tmp_path / "b.pt", 1000, n_steps=3)
    ds = filled_ds("zero3", micro_batch=3)
    validate_ds_config(ds, world_size=2)
    env = repo_env(OMP_NUM_THREADS="1")
    runs = {
        "deepspeed": ["bash", str(LAUNCH / "single_node.sh")],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                     "{port}", RUN_ZO],
        "accelerate": ["bash", str(LAUNCH / "accelerate.sh")],
    }
    for name, cmd in runs.items():
        spec = write_spec(tmp_path / f"{name}.spec.json",
                          [scenario(name, llama, ds, ZO_EAGER, tmp_path / "b.pt", tmp_path)])
        port = str(free_port())
        cmd = [c.replace("{port}", port) for c in cmd] + ["--spec", str(spec)]
        p = subprocess.run(cmd, env=dict(env, GPUS="2", MASTER_PORT=port, ENTRY=RUN_ZO), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{name}: {tail(p, 4000)}"
        if name != "torchrun":
            assert p.stdout.startswith("+ "), p.stdout[:200]  # the script printed its command

    ref = reference(llama, ZO_EAGER, batches, threads=1)  # one torch thread: see harness.reference_engine
    base = _records(tmp_path / "deepspeed.traj.jsonl")
    assert len(base) == 3
    w = worker_weights(tmp_path / "deepspeed")
    for name in runs:
        got = compare(tmp_path / name, *ref)
        assert got["world"] == 2 and got["kind"] == "zero3"
        # the same trajectory, record for record, and the same weights, bit for bit
        assert _records(tmp_path / f"{name}.traj.jsonl") == base, name
        for k, v in worker_weights(tmp_path / name).items():
            assert torch.equal(v, w[k]), (name, k)
