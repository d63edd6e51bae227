"""Bad input (issue 6): each case is one ``zo-deepspeed`` command that must end with exactly one line
``zo-deepspeed CMD: error: ...`` naming the problem (and the fix), a non-zero exit status, no traceback,
and nothing written: its folder (inputs, and the run/output paths it names) is byte-for-byte as before.

All cases run in one subprocess (``python tests/test_bad_input.py SPEC OUT``) that calls
``zo_deepspeed.cli.main`` for each, exactly what ``python -m zo_deepspeed`` does with its return value:
importing torch, transformers and DeepSpeed once instead of once per case keeps the suite at seconds.
One case also runs as a real process to pin the exit status end to end.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import drive_cases, repo_env, run_cli, tiny_llama

TRAIN = ["model.path={m}", "data.num_train=8", "data.num_dev=4", "data.num_test=4", "data.max_length=64",
         "train.batch_size=4", "train.steps=1", "zo.compile=false", "train.output_dir={d}/run"]
SST2 = ["data.task=sst2", "data.data_dir={d}/data"]
DS = ["--ds-config", "{d}/ds.json"]
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}

# (id, argv, needle, files written into the case's folder {d} first). {m}: the tiny model;
# {notok}: a model folder without tokenizer files; {mix}: that model with a foreign (larger) tokenizer.
CASES = [
    ("yaml_malformed", ["train", "--config", "{d}/run.yaml", *TRAIN], "does not parse",
     {"run.yaml": "zo: {lr: 1e-6\n"}),
    ("yaml_unknown_key", ["train", "--config", "{d}/run.yaml", *TRAIN], "unknown key(s) ['lrr']",
     {"run.yaml": "zo:\n  lrr: 1.0e-6\n"}),
    ("yaml_unknown_section", ["train", "--config", "{d}/run.yaml", *TRAIN], "unknown config section 'optim'",
     {"run.yaml": "optim:\n  lr: 1\n"}),
    ("config_file_missing", ["train", "--config", "{d}/nope.yaml", *TRAIN], "does not exist", {}),
    ("override_unknown_key", ["train", *TRAIN, "zo.nosuch=1"], "unknown key 'zo.nosuch'", {}),
    ("override_bad_value", ["train", *TRAIN, "train.steps=ten"], "train.steps", {}),
    ("override_no_equals", ["train", *TRAIN, "train.steps"], "section.key=value", {}),
    ("ds_optimizer_block", ["train", *DS, *TRAIN], "'optimizer' block",
     {"ds.json": {**ZERO3, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}}),
    ("ds_zero_stage2", ["train", *DS, *TRAIN], "zero_optimization.stage=2",
     {"ds.json": {"zero_optimization": {"stage": 2}}}),
    ("ds_offload_without_stage3", ["train", *DS, *TRAIN], "needs zero_optimization.stage=3",
     {"ds.json": {"zero_optimization": {"stage": 0, "offload_param": {"device": "cpu"}}}}),
    ("ds_offload_optimizer", ["train", *DS, *TRAIN], "no optimizer state to offload",
     {"ds.json": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}}),
    ("ds_nvme_without_path", ["train", *DS, *TRAIN], "nvme_path",
     {"ds.json": {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}}),
    ("ds_bf16_with_fp32_model", ["train", *DS, *TRAIN], "set model.dtype=bfloat16",
     {"ds.json": {**ZERO3, "bf16": {"enabled": True}}}),
    ("ds_invalid_json", ["train", *DS, *TRAIN], "is not valid JSON", {"ds.json": "{\"zero_optimization\": \n"}),
    ("ds_unknown_key", ["train", *DS, *TRAIN], "unknown ds_config key 'zero_optimisation'",
     {"ds.json": {"zero_optimisation": {"stage": 3}}}),
    ("model_path_missing", ["train", *TRAIN, "model.path={d}/no_model"], "not an HF model folder", {}),
    ("model_without_tokenizer", ["train", *TRAIN, "model.path={notok}"], "has no usable tokenizer", {}),
    ("model_tokenizer_mismatch", ["train", *TRAIN, "model.path={mix}"], "tokenizer and weights come from different",
     {}),
    ("task_unknown", ["train", *TRAIN, "data.task=nosuch_task"], "unknown task 'nosuch_task'", {}),
    ("data_dir_missing", ["train", *TRAIN, "data.task=sst2", "data.data_dir={d}/nope"], "data directory not found",
     {}),
    ("data_file_missing", ["train", *TRAIN, *SST2], "no train file", {"data/README": "no data here\n"}),
    ("data_wrong_fields", ["train", *TRAIN, *SST2], "missing field 'sentence'",
     {"data/train.jsonl": '{"text": "a fine film", "label": 1}\n'}),
    ("data_empty", ["train", *TRAIN, *SST2], "empty dataset", {"data/train.jsonl": ""}),
    ("data_label_not_in_verbalizer", ["train", *TRAIN, *SST2], "label 7 is not in the verbalizer",
     {"data/train.jsonl": '{"sentence": "a fine film", "label": 1}\n{"sentence": "dull", "label": 7}\n'}),
    ("seq_longer_than_context", ["train", *TRAIN, "data.max_length=100000"], "longer than the model's context", {}),
    ("eps_zero", ["train", *TRAIN, "zo.eps=0"], "zo.eps must be > 0", {}),
    ("eps_negative", ["train", *TRAIN, "zo.eps=-1e-3"], "zo.eps must be > 0", {}),
    ("lr_negative", ["train", *TRAIN, "zo.lr=-1e-6"], "zo.lr must be >= 0", {}),
    ("lr_zero", ["train", *TRAIN, "zo.lr=0"], "zo.lr=0 with train.steps > 0", {}),
    ("lr_not_finite", ["train", *TRAIN, "zo.lr=nan"], "zo.lr must be a finite number", {}),
    ("skip_cap_negative", ["train", *TRAIN, "zo.max_consecutive_skips=-1"], "zo.max_consecutive_skips", {}),
    ("output_dir_unwritable", ["train", *TRAIN, "train.output_dir={d}/a_file/run"], "cannot be written",
     {"a_file": "not a folder\n"}),
    ("batch_not_divisible", ["train", *TRAIN, "train.grad_accum=3"], "does not divide into world size 1", {}),
    ("run_dir_already_used", ["train", *TRAIN], "already holds a run; pass --resume",
     {"run/trajectory.jsonl": '{"format": "zo_deepspeed.trajectory/1"}\n', "run/config.json": "{}"}),
    ("resume_without_run", ["train", "--resume", "train.output_dir={d}/run"], "config.json not found", {}),
    ("replay_other_base_model", ["replay", "--model", "{notok}", "--log", "{d}/trajectory.jsonl", "--out", "{d}/out"],
     "was recorded on another base model", {}),  # the log is written by the fixture (it needs {m}'s fingerprint)
    ("replay_missing_log", ["replay", "--model", "{m}", "--log", "{d}/nope.jsonl", "--out", "{d}/out"],
     "does not exist", {}),
    ("export_without_checkpoint", ["export", "--run-dir", "{d}/run", "--out", "{d}/out"], "has no checkpoint",
     {"run/metrics.jsonl": ""}),
]


def _snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): (f.read_bytes() if f.is_file() else None) for f in sorted(folder.rglob("*"))}


def _fmt(argv, **kw):
    return [a.format(**kw) for a in argv]


@pytest.fixture(scope="module")
def results(tiny_lm_dir, tmp_path_factory):
    """Run every case in one driver process; returns {id: (rc, stderr, folder, snapshot before)}."""
    from zo_deepspeed.trajectory import LogHeader, model_fingerprint

    root = tmp_path_factory.mktemp("bad_input")
    notok, mix = root / "model_notok", root / "model_mix"
    tiny_llama(seed=1, save_to=notok, vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    shutil.copytree(notok, mix)
    for f in tiny_lm_dir.iterdir():  # the tiny model's 49k-token tokenizer next to a 128-token model
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, mix / f.name)
    spec, before = [], {}
    for cid, argv, _, files in CASES:
        d = root / cid
        d.mkdir()
        for name, content in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
        if cid == "replay_other_base_model":  # a trainer log header recorded on the tiny model
            header = LogHeader(zo={}, restore="inplace", model=str(tiny_lm_dir),
                               base_fingerprint=model_fingerprint(tiny_lm_dir))
            (d / "trajectory.jsonl").write_text(json.dumps(header.to_dict()) + "\n")
        before[cid] = _snapshot(d)
        spec.append([cid, _fmt(argv, m=tiny_lm_dir, d=d, notok=notok, mix=mix)])
    (root / "spec.json").write_text(json.dumps(spec))
    env = repo_env()
    env.pop("ZO_DEEPSPEED_DEBUG", None)
    p = subprocess.run([sys.executable, __file__, str(root / "spec.json"), str(root / "out.json")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=root)
    assert p.returncode == 0, p.stderr[-5000:]
    out = json.loads((root / "out.json").read_text())
    return {cid: (out[cid][0], out[cid][1], root / cid, before[cid]) for cid, *_ in CASES}


@pytest.mark.parametrize("cid,argv,needle,files", CASES, ids=[c[0] for c in CASES])
def test_bad_input(cid, argv, needle, files, results):
    rc, err, folder, before = results[cid]
    cmd = argv[0]
    lines = [ln for ln in err.splitlines() if ln.startswith(f"zo-deepspeed {cmd}: error:")]
    assert rc != 0 and len(lines) == 1 and "Traceback" not in err, f"exit {rc}:\n{err[-3000:]}"
    assert needle in lines[0], lines[0]
    assert len(lines[0]) < 400, lines[0]  # one readable line, not a dump
    assert _snapshot(folder) == before, "the refused command wrote into its folder"


def test_exit_status_of_a_real_process(tiny_lm_dir, tmp_path):
    (tmp_path / "run.yaml").write_text("zo: {lr: 1e-6\n")
    p = run_cli(["train", "--config", str(tmp_path / "run.yaml"), f"train.output_dir={tmp_path / 'run'}"],
                check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("zo-deepspeed train: error: config file")
    assert not (tmp_path / "run").exists()


def test_world_size_that_does_not_divide_the_batch():
    # the CLI case above runs at world size 1 (with grad_accum); this is the same check at world size 2
    from zo_deepspeed.build import build_ds_config
    from zo_deepspeed.run_config import RunConfig, TrainConfig

    cfg = RunConfig(train=TrainConfig(batch_size=3))
    with pytest.raises(ValueError, match="does not divide into world size 2 x train.grad_accum=1; pick a multiple"):
        build_ds_config(cfg, 2, None)


if __name__ == "__main__":
    drive_cases(sys.argv[1], sys.argv[2])
