"""The zo-deepspeed CLI end to end on a tiny model with the real tokenizer and task data."""
from __future__ import annotations

import json

import pytest
import torch

from harness import hf_weights, read_metrics, read_trajectory, run_cli

pytestmark = pytest.mark.dist

ARGS = ["data.num_train=32", "data.num_dev=8", "data.num_test=16", "data.max_length=64", "train.batch_size=4",
        "train.eval_batch_size=8", "zo.lr=1e-3", "zo.eps=1e-3", "zo.weight_decay=0.01", "model.dtype=float32"]


def test_cli_two_ranks_zero3_matches_one_process_and_resumes(tiny_lm_dir, tmp_path):
    common = [f"model.path={tiny_lm_dir}", *ARGS]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(["train", *common, "train.steps=4", "train.eval_every=2", f"train.output_dir={one}"])
    p = run_cli(["train", *common, "train.steps=4", "train.eval_every=2", f"train.output_dir={two}"], world=2)
    assert "zero-shot accuracy" in p.stdout and "fine-tuned accuracy" in p.stdout

    # the run directory holds what it promises
    for f in ("config.json", "metrics.jsonl", "trajectory.jsonl", "checkpoints/latest", "export/config.json",
              "export/model.safetensors", "export/tokenizer.json", "monitor"):
        assert (two / f).exists(), f
    cfg = json.loads((two / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["resolved_ds_config"]["zero_optimization"]["stage"] == 3
    _, traj = read_trajectory(two / "trajectory.jsonl")  # whole: a header and one line per record
    assert len(traj) == 4 and len(traj[0].example_ids) == 4

    # ZeRO-3 at 2 ranks == one process: losses, eval accuracy and the exported weights
    m1, m2 = read_metrics(one), read_metrics(two)
    l1 = [r["loss"] for r in m1 if "loss" in r]
    l2 = [r["loss"] for r in m2 if "loss" in r]
    assert l2 == pytest.approx(l1, rel=1e-6)
    acc = lambda ms: [(r["step"], r[k]) for r in ms for k in r if k.endswith("/accuracy")]  # noqa: E731
    assert acc(m1) == acc(m2) and len(acc(m1)) == 3  # zero-shot, dev at step 2, final test
    w1, w2 = hf_weights(one / "export"), hf_weights(two / "export")
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=1e-6), k

    # the HF export reloads to the weights the ranks held (checkpoint partitions, gathered)
    base = hf_weights(tiny_lm_dir)
    assert any(not torch.equal(base[k], w2[k]) for k in base)  # training changed something

    # resume: stop after 2 steps, continue to 4 -> the same weights as the uninterrupted run
    res = tmp_path / "res"
    run_cli(["train", *common, "train.steps=2", f"train.output_dir={res}"], world=2)
    run_cli(["train", "--resume", f"train.output_dir={res}", "train.steps=4"], world=2)
    w3 = hf_weights(res / "export")
    for k in w2:
        assert torch.equal(w2[k], w3[k]), k
    assert len(read_trajectory(res / "trajectory.jsonl")[1]) == 4


def test_cli_replay_export_and_plot(tiny_lm_dir, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", f"model.path={tiny_lm_dir}", *ARGS, "train.steps=3", f"train.output_dir={run}",
             "train.zero_shot_eval=false"])
    out = tmp_path / "replayed"
    run_cli(["replay", "--model", str(tiny_lm_dir), "--log", str(run / "trajectory.jsonl"), "--out", str(out)])
    live, rep = hf_weights(run / "export"), hf_weights(out)
    for k in live:
        assert torch.allclose(live[k], rep[k], rtol=1e-6, atol=1e-7), k
    exp = tmp_path / "exported"
    run_cli(["export", "--run-dir", str(run), "--out", str(exp)])
    for k, v in hf_weights(exp).items():
        assert torch.equal(v, live[k]), k
    p = run_cli(["plot", "--run-dir", str(run)])
    png = run / "curves.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG", p.stdout


@pytest.mark.parametrize("args,needle", [
    (["zo.eps=0"], "zo.eps must be > 0"),
    (["zo.lr=-1"], "zo.lr must be >= 0"),
    (["zo.nosuch=1"], "unknown key 'zo.nosuch'"),
    (["model.path=/nonexistent/model"], "not an HF model folder"),
    (["data.task=nosuch_task"], "nosuch_task"),
])
def test_cli_bad_input_one_line_and_nonzero(args, needle, tiny_lm_dir, tmp_path):
    p = run_cli(["train", f"model.path={tiny_lm_dir}", *ARGS, "train.steps=1", f"train.output_dir={tmp_path / 'r'}",
                 *args], check=False)
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("zo-deepspeed train: error:")]
    assert len(err) == 1 and needle in err[0], p.stderr[-2000:]
    assert not (tmp_path / "r" / "checkpoints").exists()
