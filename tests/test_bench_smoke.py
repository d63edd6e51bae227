"""bench/gpu.py and bench/gpu.sh stay runnable without a GPU: tiny shapes on the CPU, the shell script's dry run.

The real GPU run (bash bench/gpu.sh on an H100/H200) is not part of the test suite.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    before = (REPO / "bench" / "RESULTS.md").read_text()
    p = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--device", "cpu", "--json-out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(out.read_text())
    res = d["results"]
    assert set(res) == {"pass", "step", "opt30b"}
    passes = {r[1] for r in res["pass"]["rows"]}
    assert "device-to-device copy" in passes and any(k.startswith("MeZO reference") for k in passes)
    assert len(res["step"]["rows"]) == 4 and all(r[4] > 0 for r in res["step"]["rows"])  # step / (2 x forward)
    raw = res["opt30b"]["raw"]
    assert raw and all("step_s" in r and r["plan_total"] > 0 for r in raw)
    assert (REPO / "bench" / "RESULTS.md").read_text() == before  # smoke runs never write results


def test_gpu_bench_refuses_cpu_without_smoke():
    p = subprocess.run([sys.executable, "bench/gpu.py", "--device", "cpu", "--parts", "pass"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode != 0 and "--smoke" in p.stderr


def test_gpu_sh_dry_run_prints_command():
    env = dict(os.environ, DRY_RUN="1", OUT="/tmp/gpu-out", PARTS="pass,opt30b", EXTRA="--repeats 3")
    p = subprocess.run(["bash", "bench/gpu.sh"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("+ ") and "bench/gpu.py --parts pass,opt30b --mem-cap-gib 80" in line
    assert "--json-out /tmp/gpu-out/gpu.json" in line and line.endswith("--repeats 3")


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_gpu_sh_shellcheck():
    p = subprocess.run(["shellcheck", "bench/gpu.sh"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
