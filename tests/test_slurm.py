"""launch/slurm.sbatch on a real 2-node SLURM cluster (../shared/slurm/local-cluster.sh: slurmctld plus
two slurmd "nodes" n1, n2 on this machine; needs root, installs slurm-wlm and munge if missing).

* ZeRO-3 across 2 nodes x 1 rank through the trainer CLI, preempted mid-run the way
  `#SBATCH --signal=B:TERM@120` does it (SIGTERM to the batch shell): the ranks checkpoint, the
  job requeues itself, the restart resumes with --resume, and the finished run's trajectory
  and exported weights equal a single-process run.
* ZeRO++ hpZ across 2 nodes x 2 ranks (the shipped zero3_hpz.json, hpZ group = the 2 ranks of
  a node) through tests/dist/run_zo.py: same trajectory and weights as one process.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from harness import (DIST, REPO, ZO_EAGER, compare, filled_ds, free_port, hf_weights, read_trajectory, reference,
                     rel_err, repo_env, replayed, run_cli, save_batches, scenario, write_spec)

pytestmark = pytest.mark.cluster

CLUSTER = REPO.parent / "shared" / "slurm" / "local-cluster.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"


def _sh(*cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p


def _two_idle_nodes() -> bool:
    if not shutil.which("sinfo"):
        return False
    p = _sh("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=30)
    states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
    return p.returncode == 0 and all(states.get(n) == "idle" for n in ("n1", "n2"))


@pytest.fixture(scope="module")
def slurm():
    started = False
    if not _two_idle_nodes():
        if os.geteuid() != 0:
            pytest.skip("no local SLURM cluster running, and starting one needs root "
                        "(sudo ../shared/slurm/local-cluster.sh start 2)")
        assert CLUSTER.exists(), f"{CLUSTER} not found: the SLURM test needs the shared/ folder beside the repo"
        _sh("bash", str(CLUSTER), "start", "2", timeout=900)
        started = True
    assert _two_idle_nodes(), _sh("sinfo", check=False).stdout
    yield
    if started:
        _sh("bash", str(CLUSTER), "stop", check=False)


def submit(args: list[str], out: Path, **env) -> str:
    e = {k: v for k, v in repo_env(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()), **env).items()
         if not k.startswith("SLURM_")}
    p = subprocess.run(["sbatch", "--parsable", f"--chdir={REPO}", f"--output={out}", str(SBATCH), *args],
                       env=e, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job(jid: str) -> dict:
    p = _sh("scontrol", "show", "job", "-o", jid, check=False)
    return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)


def wait(jid: str, out: Path, timeout: float = 600, on_running=None) -> dict:
    """Until the job has finished. A requeued job is held ~2 min by SLURM (BeginTime): release it after a few
    seconds, not at once. The requeue is issued from inside the batch script, which is still exiting on the
    nodes; releasing at once can schedule the new incarnation before the old one is gone, and slurmctld then
    kills it ("Killing non-startable batch job: Job credential revoked", seen here once in ~10 runs)."""
    t0 = time.time()
    held_since = None
    while time.time() - t0 < timeout:
        info = job(jid)
        state, reason = info.get("JobState"), info.get("Reason")
        if state == "PENDING" and reason == "BeginTime":
            held_since = held_since or time.time()
            if time.time() - held_since >= 5:
                _sh("scontrol", "update", f"JobId={jid}", "StartTime=now")
        else:
            held_since = None
        if state == "RUNNING" and on_running is not None and on_running():
            on_running = None
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return info
        time.sleep(0.5)
    _sh("scancel", jid, check=False)
    raise AssertionError(f"job {jid} did not finish in {timeout:.0f} s:\n{out.read_text()[-4000:] if out.exists() else ''}")


# -- ZeRO-3, 2 nodes, preempted and requeued, through the CLI ----------------------------------

ARGS = ["data.num_train=32", "data.num_dev=8", "data.num_test=16", "data.max_length=64", "train.batch_size=4",
        "train.eval_batch_size=8", "zo.lr=1e-4", "zo.eps=1e-3", "zo.weight_decay=0.01", "zo.compile=false",
        "model.dtype=float32", "train.zero_shot_eval=false", "train.steps=12"]


def test_zero3_two_nodes_preempted_requeued_matches_one_process(slurm, tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the single-process reference: see harness.reference_engine
    # options before the dotted overrides: argparse does not resume positionals after an option
    common = ["--ds-config", str(REPO / "ds_configs/zero3.json"), f"model.path={tiny_lm_dir}", *ARGS]
    one, two, out = tmp_path / "one", tmp_path / "two", tmp_path / "job.out"
    run_cli(["train", *common, f"train.output_dir={one}"])

    jid = submit([*common, f"train.output_dir={two}"], out, GPUS_PER_NODE="1")  # the script adds "train"
    traj = two / "trajectory.jsonl"

    def preempt() -> bool:  # once a step is logged, do what --signal=B:TERM@120 does at the time limit
        if traj.exists() and len(traj.read_text().splitlines()) >= 2:
            _sh("scancel", "--signal=TERM", "--batch", jid)
            return True
        return False

    info = wait(jid, out, on_running=preempt)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    # the whole path: two nodes, signal, checkpoint, requeue, resume
    assert re.search(r"2 nodes x 1 ranks, master n1:\d+, restart 0", log), log[-4000:]
    assert "[node 0 " in log and "[node 1 " in log and "--no_ssh --node_rank 1" in log
    assert "got SIGTERM" in log
    m = re.search(r"SIGTERM: checkpoint at step (\d+) written; exiting 75", log)
    assert m and 0 < int(m.group(1)) < 12, "the run was not preempted mid-way:\n" + log[-4000:]
    assert re.search(r"requeueing job \d+ \(program exit \d+, restart 0\)", log)
    assert "restart 1" in log and "train --resume" in log and "resume: loaded" in log
    assert info["Restarts"] == "1"

    # ZeRO-3 over 2 nodes (with a preemption in the middle) == one process
    (_, r1), (_, r2) = read_trajectory(one / "trajectory.jsonl"), read_trajectory(traj)
    assert len(r1) == len(r2) == 12
    for a, b in zip(r1, r2):
        assert (a.step, a.seeds, a.example_ids) == (b.step, b.seeds, b.example_ids)
        assert b.loss_plus == pytest.approx(a.loss_plus, rel=1e-6)
        assert b.loss_minus == pytest.approx(a.loss_minus, rel=1e-6)
        # g = (L+ - L-) / (2 eps): its tolerance is the losses' (1e-6 relative) divided by eps
        assert b.g == pytest.approx(a.g, abs=1e-6 * (abs(a.loss_plus) + abs(a.loss_minus)) / (2 * 1e-3))
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["resolved_ds_config"]["zero_optimization"]["stage"] == 3
    # Weights. The two layouts sum each loss in a different order, so the losses agree to ~1e-7 and g,
    # which divides a loss difference by 2 eps, to ~1e-4; lr * g * z then leaves ~1e-6 (relative) in
    # the weights after 12 steps. So: close to the one-process weights, and exactly what the run's own
    # trajectory says (its log replayed onto the base weights in one process).
    w1, w2 = hf_weights(one / "export"), hf_weights(two / "export")
    m = replayed(tiny_lm_dir, traj)
    w0 = hf_weights(tiny_lm_dir)
    for k in w1:
        assert not torch.equal(w1[k], w0[k]), k  # training moved it
        assert rel_err(w2[k], w1[k]) <= 1e-5, k
        assert rel_err(m.state_dict()[k], w2[k]) <= 1e-6, k


# -- ZeRO++ hpZ, 2 nodes x 2 ranks --------------------------------------------------------------

def test_hpz_two_nodes_by_two_ranks_matches_one_process(slurm, model_dirs, tmp_path):
    from zo_deepspeed.ds_config import validate_ds_config

    llama = model_dirs["llama"]
    batches = save_batches(tmp_path / "b.pt", 1000, n_steps=3, batch=8)
    zo = ZO_EAGER
    # one hpZ config per process: DeepSpeed creates the hpZ process groups once
    ds = filled_ds("zero3_hpz", world=4, gpus_per_node=2, micro_batch=2)
    validate_ds_config(ds, world_size=4, gpus_per_node=2)
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 2
    spec = write_spec(tmp_path / "spec.json", [scenario("zero3_hpz", llama, ds, zo, tmp_path / "b.pt", tmp_path)])
    out = tmp_path / "job.out"
    jid = submit(["--spec", str(spec)], out, GPUS_PER_NODE="2", ENTRY=str(DIST / "run_zo.py"))
    info = wait(jid, out)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-4000:])
    assert "2 nodes x 2 ranks" in log and "--no_ssh --node_rank 1" in log

    got = compare(tmp_path / "zero3_hpz", *reference(llama, zo, batches, threads=1))
    assert got["kind"] == "zero3-hpz" and got["world"] == 4
    header, records = read_trajectory(tmp_path / "zero3_hpz.traj.jsonl")
    assert header["world_size"] == 4 and len(records) == 3
