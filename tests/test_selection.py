"""Best-dev selection (train.select, MeZO's load_best_model_at_end) and zo-deepspeed eval's in-context and
calibrated modes, end to end through the CLI on a tiny model with the real tokenizer (one process each)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from harness import read_metrics, replayed, run_cli, write_jsonl
from zo_deepspeed.run_config import load_run_config
from zo_deepspeed.tasks import build_splits, get_task, score_candidates

WORDS = "good bad fine dull great awful nice poor".split()

# A task whose dev accuracy is scripted (0.5, 0.9, 0.6 at the 1st, 2nd, 3rd dev evaluation): the dev metric
# peaks mid-run whatever the weights do. Test accuracy is the real one.
PEAK_TASK = '''
from zo_deepspeed.tasks import ClassificationTask, register_task
from zo_deepspeed.tasks import metrics

DEV = [0.5, 0.9, 0.6]
CALLS = []


@register_task("peak_sentiment")
class Peak(ClassificationTask):
    layouts = {"d": ("text", "label")}
    candidates = (" negative", " positive")
    label_map = {0: 0, 1: 1}

    def render(self, row):
        return "Review: " + row.text("text") + "\\nSentiment:"

    def score(self, examples, predictions):
        if examples[0].id.startswith("tr"):  # dev examples come from the train file
            CALLS.append(len(examples))
            return {"accuracy": DEV[len(CALLS) - 1]}
        return {"accuracy": metrics.accuracy(list(predictions), [e.gold_labels for e in examples])}
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("peak")
    rng = random.Random(0)
    for name, prefix, n in (("train", "tr", 40), ("val", "te", 16)):
        rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(5)), "label": i % 2, "idx": f"{prefix}{i}"}
                for i in range(n)]
        write_jsonl(root / f"{name}.jsonl", rows)
    (root / "peak_task.py").write_text(PEAK_TASK)
    return root


ARGS = ["data.num_train=16", "data.num_dev=8", "data.num_test=8", "data.max_length=64", "train.batch_size=4",
        "train.eval_batch_size=8", "zo.lr=1e-3", "zo.eps=1e-3", "model.dtype=float32", "train.export=false",
        "train.zero_shot_eval=false", "train.keep_checkpoints=1", "zo.compile=false"]


def test_best_dev_metric_picks_the_mid_run_checkpoint(tiny_lm_dir, data, tmp_path):
    run = tmp_path / "run"
    task_spec = f"{data / 'peak_task.py'}:peak_sentiment"
    p = run_cli(["train", f"model.path={tiny_lm_dir}", f"data.task={task_spec}", f"data.data_dir={data}", *ARGS,
                 "train.steps=3", "train.eval_every=1", "train.select=dev_metric", f"train.output_dir={run}"])
    m = read_metrics(run)
    assert [(r["step"], r["dev/accuracy"]) for r in m if "dev/accuracy" in r] == [(1, 0.5), (2, 0.9), (3, 0.6)]
    ck = run / "checkpoints"
    assert (ck / "best").read_text() == "step_00000002" and (ck / "latest").read_text() == "step_00000003"
    assert sorted(d.name for d in ck.glob("step_*")) == ["step_00000002", "step_00000003"]  # keep 1 + the best
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["step"] == 2 and summary["best"]["key"] == "dev/accuracy"
    at_best = [(r["step"], r["test_at_best/accuracy"]) for r in m if "test_at_best/accuracy" in r]
    assert at_best == [(2, summary["results"]["best"]["value"])]
    assert summary["results"]["final"]["value"] == [r["test/accuracy"] for r in m if "test/accuracy" in r][-1]
    assert "at the best dev checkpoint (step 2" in p.stdout
    # the closing lines: the final weights' step, then the best checkpoint's result
    assert "(3 ZO steps; run dir" in p.stdout
    assert f"at the best dev checkpoint (step 2) accuracy: {summary['results']['best']['value']:.4f}" in p.stdout

    # the test number at "best" is the step-2 weights': replay the log's first 2 steps and score by hand
    lines = (run / "trajectory.jsonl").read_text().splitlines()
    log2 = tmp_path / "two.jsonl"
    log2.write_text("\n".join(lines[:3]) + "\n")  # the header and steps 0, 1
    model = replayed(tiny_lm_dir, log2).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    task = get_task(task_spec)
    test = build_splits(task, data, seed=0, num_train=16, num_dev=8, num_test=8, test_seed=0)["test"]
    with torch.no_grad():
        preds, _ = score_candidates(model, tok, test, 64, batch_size=8)
    acc = sum(p == e.label for p, e in zip(preds, test)) / len(test)
    assert summary["results"]["best"]["value"] == pytest.approx(acc)


@pytest.mark.dist
def test_best_dev_selection_under_zero3_two_ranks_matches_one_process(tiny_lm_dir, data, tmp_path):
    """The dev evaluations, the best checkpoint (saved and loaded back by both ranks) and the test result at it are
    those of one process."""
    task_spec = f"{data / 'peak_task.py'}:peak_sentiment"
    common = [f"model.path={tiny_lm_dir}", f"data.task={task_spec}", f"data.data_dir={data}", *ARGS, "train.steps=3",
              "train.eval_every=1", "train.select=dev_metric"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(["train", *common, f"train.output_dir={one}"])
    run_cli(["train", *common, f"train.output_dir={two}"], world=2)
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s2["best"]["step"] == s1["best"]["step"] == 2
    assert s2["results"]["best"]["value"] == pytest.approx(s1["results"]["best"]["value"], abs=1e-12)
    assert json.loads((two / "config.json").read_text())["resolved_ds_config"]["zero_optimization"]["stage"] == 3
    assert sorted(d.name for d in (two / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]


def test_best_dev_loss_is_the_lowest_logged_dev_loss(tiny_lm_dir, data, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", f"model.path={tiny_lm_dir}", f"data.task={data / 'peak_task.py'}:peak_sentiment",
             f"data.data_dir={data}", *ARGS, "train.steps=2",
             "train.eval_every=1", "train.select=dev_loss", "zo.lr=5e-2", f"train.output_dir={run}"])
    m = read_metrics(run)
    losses = [(r["step"], r["dev/loss"]) for r in m if "dev/loss" in r]
    assert [s for s, _ in losses] == [1, 2]  # the last step is evaluated too, as HF's evaluation_strategy=steps
    best_step, best_value = min(losses, key=lambda x: (x[1], x[0]))
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["best"]["step"], summary["best"]["value"]) == (best_step, pytest.approx(best_value))
    assert (run / "checkpoints" / "best").read_text() == f"step_{best_step:08d}"
    assert summary["select"] == "dev_loss" and summary["objective"] == "choice"
    assert not any(k.startswith("dev/accuracy") for r in m for k in r)  # MeZO evaluates only the loss on dev
    assert {"truncated_train", "truncated_dev", "truncated_test"} <= {k for r in m for k in r}


def test_select_needs_eval_every():
    with pytest.raises(ValueError, match="set train.eval_every > 0"):
        load_run_config(None, ["train.select=dev_loss", "train.steps=2"])
    assert load_run_config(None, ["train.select=dev_loss", "train.eval_every=4000"]).train.select == "dev_loss"


def test_eval_in_context_and_calibrated(tiny_lm_dir, data, tmp_path):
    out = tmp_path / "icl.json"
    p = run_cli(["eval", "--demos", "2", "--calibrate", "icl_sfc", "--out", str(out), f"model.path={tiny_lm_dir}",
                 f"data.task={data / 'peak_task.py'}:peak_sentiment", f"data.data_dir={data}", "data.num_test=8",
                 "data.max_length=64"])
    rec = json.loads(out.read_text())
    assert (rec["demos"], rec["calibrate"], rec["n"], rec["metric"]) == (2, "icl_sfc", 8, "accuracy")
    assert "(2 demonstrations, calibration icl_sfc;" in p.stdout and 0.0 <= rec["value"] <= 1.0
    assert rec["truncation"]["truncated"] == 0
    p = run_cli(["eval", "--calibrate", "sfc", f"model.path={tiny_lm_dir}", "data.task=squad",
                 f"data.data_dir={data}"], check=False)
    assert p.returncode != 0 and "generation task" in p.stderr
