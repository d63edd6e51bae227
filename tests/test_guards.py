"""Issue 15: never lose a user's files, never train on silently wrong input.

* ``CASES``: each one ``zo-deepspeed`` command on a real (tiny) run directory, model folder or data that must
  be refused with exit 2 and exactly one line naming the problem and the fix, no traceback, and its case
  folder (the run, the model copy, the outputs it names) byte-for-byte as before. All cases run in one
  driver process (harness.run_cases), as tests/test_bad_input.py does.
* resume over each kind of damaged log it repairs ends with a log whose replay equals the run's weights;
* Ctrl-C (SIGINT) checkpoints and exits 130 like SIGTERM does (75), and the run resumes;
* the guard, the model-file checks and the log verification as units.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import (ZO_EAGER, hf_weights, one_error_line, read_trajectory, replayed, repo_env, run_cases, run_cli,
                     snapshot, tiny_llama)

TINY = ["data.num_train=8", "data.num_dev=4", "data.num_test=4", "data.max_length=64", "train.batch_size=4",
        "zo.compile=false", "train.zero_shot_eval=false"]
TRAIN = ["model.path={m}", *TINY, "train.steps=1", "train.output_dir={d}/run"]
RESUME = ["train", "--resume", "train.output_dir={d}/run"]
REPLAY = ["replay", "--model", "{m}", "--log", "{d}/run/trajectory.jsonl"]


# -- case preparation: each gets its folder d and the shared inputs -------------------------------------------
def _run(d, ctx):
    shutil.copytree(ctx["template"], d / "run")


def _model(d, ctx, name="model"):
    shutil.copytree(ctx["m"], d / name)


def _log(edit):
    """The template run with its trajectory log's lines edited (header first, then steps 0, 1, 2)."""
    def prep(d, ctx):
        _run(d, ctx)
        p = d / "run" / "trajectory.jsonl"
        p.write_text("".join(line + "\n" for line in edit(p.read_text().splitlines())))
    return prep


def _write(**files):
    def prep(d, ctx):
        for name, content in files.items():
            (d / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (d / name).write_bytes(content)
            else:
                (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return prep


def _both(*preps):
    def prep(d, ctx):
        for p in preps:
            p(d, ctx)
    return prep


def _edit_model(fn):
    def prep(d, ctx):
        _model(d, ctx)
        fn(d / "model")
    return prep


def _config(**changes):
    def fn(m):
        c = json.loads((m / "config.json").read_text())
        c.update(changes)
        (m / "config.json").write_text(json.dumps(c))
    return fn


def _truncate_weights(m):
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _shard_index(m):
    """A sharded checkpoint whose index names a shard that is not there."""
    f = m / "model.safetensors"
    f.rename(m / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(m / "model-00001-of-00002.safetensors"), "pt") as s:
        keys = list(s.keys())
    wmap = {k: "model-00001-of-00002.safetensors" for k in keys}
    wmap[keys[-1]] = "model-00002-of-00002.safetensors"
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))


def _flip_ckpt_byte(d, ctx):
    _run(d, ctx)
    f = d / "run" / "checkpoints" / "step_00000003" / "rank00000_of_00001.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))


def _log_dir(d, ctx):
    _run(d, ctx)
    (d / "run" / "trajectory.jsonl").unlink()
    (d / "run" / "trajectory.jsonl").mkdir()


def _state_damaged(d, ctx):
    _run(d, ctx)
    (d / "run" / "checkpoints" / "step_00000003" / "state.json").write_text('{"step": ')


def _drop_log(d, ctx):
    _run(d, ctx)
    (d / "run" / "trajectory.jsonl").unlink()


def _edited(line: str) -> str:
    """A record that still parses, with one value changed (a hand-edited log)."""
    r = json.loads(line)
    r["loss_plus"] += 1.0
    return json.dumps(r, separators=(",", ":"))


def _rte(label_true):
    rows = [{"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": label_true},
            {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": not label_true}]
    return _write(**{"data/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows * 4),
                     "data/val.jsonl": "".join(json.dumps(r) + "\n" for r in rows * 2)})


SST2 = ["data.task=sst2", "data.data_dir={d}/data"]
ROWS = "".join(json.dumps({"sentence": f"film {i}", "label": i % 2}) + "\n" for i in range(12))

# (id, argv, needle in the one error line, prep(d, ctx))
CASES = [
    # -- outputs never overwrite what is there ------------------------------------------------------------------
    ("export_out_not_empty", ["export", "--run-dir", "{d}/run", "--out", "{d}/out"], "is not empty and was not written",
     _both(_run, _write(**{"out/notes.txt": "mine\n"}))),
    ("export_out_is_model_folder", ["export", "--run-dir", "{d}/run", "--out", "{d}/model"], "is a model folder",
     _both(_run, _model)),
    ("export_out_is_run_dir", ["export", "--run-dir", "{d}/run", "--out", "{d}/run"], "is the run directory", _run),
    ("export_out_contains_run_dir", ["export", "--run-dir", "{d}/run", "--out", "{d}"], "contains the run directory",
     _run),
    ("export_out_is_file", ["export", "--run-dir", "{d}/run", "--out", "{d}/out"], "is a file, not a folder",
     _both(_run, _write(out="a file\n"))),
    ("export_out_cwd", ["export", "--run-dir", "{d}/run", "--out", "."], "is the current directory", _run),
    ("export_out_empty", ["export", "--run-dir", "{d}/run", "--out", ""], "--out is empty", _run),
    ("export_run_dir_missing", ["export", "--run-dir", "{d}/nope", "--out", "{d}/out"], "is not a folder", None),
    ("replay_out_is_base_model", ["replay", "--model", "{d}/model", "--log", "{d}/run/trajectory.jsonl", "--out",
                                  "{d}/model"], "is the base model", _both(_run, _model)),
    ("replay_out_not_empty", [*REPLAY, "--out", "{d}/out"], "is not empty and was not written",
     _both(_run, _write(**{"out/a.bin": b"\x00\x01"}))),
    ("replay_out_contains_log", [*REPLAY, "--out", "{d}/run"], "contains the trajectory log", _run),
    ("replay_out_empty", [*REPLAY, "--out", ""], "--out is empty", _run),
    ("train_into_model_folder", ["train", *TRAIN, "train.output_dir={d}/model"], "is a model folder", _model),
    ("train_output_dir_empty", ["train", *TRAIN, "train.output_dir="], "train.output_dir is empty", None),
    ("train_output_dir_cwd", ["train", *TRAIN, "train.output_dir=."], "is the current directory", None),
    ("train_output_dir_foreign", ["train", *TRAIN], "is not empty and is not a zo-deepspeed run directory",
     _write(**{"run/thesis.tex": "\\documentclass{article}\n"})),
    ("train_output_dir_is_file", ["train", *TRAIN], "is a file, not a folder", _write(run="x\n")),
    ("train_over_checkpoints_without_resume", ["train", *TRAIN], "already holds a run; pass --resume",
     _both(_run, lambda d, ctx: (d / "run" / "trajectory.jsonl").unlink())),
    ("plot_out_is_metrics", ["plot", "--run-dir", "{d}/run", "--out", "{d}/run/metrics.jsonl"], "is the metrics file",
     _run),
    ("plot_out_not_an_image", ["plot", "--run-dir", "{d}/run", "--out", "{d}/keep.png"], "is not a PNG image",
     _both(_run, _write(**{"keep.png": "my notes\n"}))),
    ("plot_out_unknown_suffix", ["plot", "--run-dir", "{d}/run", "--out", "{d}/c.txt"], "unknown image type", _run),
    ("plot_out_is_dir", ["plot", "--run-dir", "{d}/run", "--out", "{d}/run"], "is a directory", _run),
    ("plot_no_metrics", ["plot", "--run-dir", "{d}", "--out", "{d}/c.png"], "metrics.jsonl not found", None),
    ("plot_metrics_bad_line", ["plot", "--run-dir", "{d}", "--out", "{d}/c.png"], "metrics.jsonl:2: not a JSON record",
     _write(**{"metrics.jsonl": '{"step": 1, "loss": 1, "g": 0}\n{"step": 2, lo\n{"step": 3}\n'})),
    ("plot_metrics_not_records", ["plot", "--run-dir", "{d}", "--out", "{d}/c.png"], "not a metrics record",
     _write(**{"metrics.jsonl": '[1, 2]\n{"step": 2}\n'})),
    # -- the trajectory log is verified before a resume or a replay builds anything ---------------------------
    ("resume_log_torn_mid", RESUME, ":3: corrupt record (not JSON) before the end",
     _log(lambda ls: ls[:2] + [ls[2][:30]] + ls[3:])),
    ("resume_log_deleted", RESUME, "trajectory.jsonl is missing but step_00000003", _drop_log),
    ("resume_checkpoint_newer_than_log", RESUME, "holds 1 step(s) but checkpoint step_00000003 is at step 3",
     _log(lambda ls: ls[:2])),
    ("resume_log_edited", RESUME, "are not the ones checkpoint step_00000003 was trained with",
     _log(lambda ls: [ls[0], _edited(ls[1]), *ls[2:]])),
    ("resume_log_gap", RESUME, "the log is not contiguous", _log(lambda ls: ls[:2] + ls[3:])),
    ("resume_log_header_damaged", RESUME, ":1: the header is not JSON", _log(lambda ls: [ls[0][:20], *ls[1:]])),
    ("resume_log_is_directory", RESUME, "is a directory", _log_dir),
    ("resume_log_other_base_model", [*RESUME, "model.path={other}"], "was recorded on another base model", _run),
    ("resume_adapter_changed", [*RESUME, "adapter.mode=lora"], "was trained with adapter.mode='none' (now 'lora')",
     _run),
    ("resume_state_json_damaged", RESUME, "state.json is damaged", _state_damaged),
    ("resume_checkpoint_corrupt", RESUME, "fails its sha256 checksum", _flip_ckpt_byte),  # refused after the lock
    ("replay_log_metrics", ["replay", "--model", "{m}", "--log", "{d}/run/metrics.jsonl", "--out", "{d}/out"],
     "is not a zo_deepspeed trajectory log", _run),
    ("replay_log_is_directory", ["replay", "--model", "{m}", "--log", "{d}/run", "--out", "{d}/out"],
     "is a directory", _run),
    ("replay_log_gap", [*REPLAY, "--out", "{d}/out"], "the log is not contiguous", _log(lambda ls: [ls[0], ls[2]])),
    ("replay_log_torn_mid", [*REPLAY, "--out", "{d}/out"], "corrupt record",
     _log(lambda ls: [ls[0], ls[1][:10], *ls[2:]])),
    ("replay_log_not_utf8", ["replay", "--model", "{m}", "--log", "{d}/t.jsonl", "--out", "{d}/out"],
     "t.jsonl:2: not UTF-8", _write(**{"t.jsonl": b'{"format": 1}\n\xff\xfe\n'})),
    ("replay_log_empty", ["replay", "--model", "{m}", "--log", "{d}/t.jsonl", "--out", "{d}/out"], "is empty",
     _write(**{"t.jsonl": ""})),
    ("replay_log_other_base_model", ["replay", "--model", "{other}", "--log", "{d}/run/trajectory.jsonl", "--out",
                                     "{d}/out"], "was recorded on another base model", _run),
    # -- model folders: architecture of config.json vs the weights, weights present and readable -------------
    ("model_config_names_bert", ["train", *TRAIN, "model.path={d}/model"], "describes a BertLMHeadModel",
     _edit_model(_config(model_type="bert", architectures=["BertForMaskedLM"]))),
    ("model_weights_truncated", ["train", *TRAIN, "model.path={d}/model"], "model.safetensors is truncated",
     _edit_model(_truncate_weights)),
    ("model_without_weights", ["train", *TRAIN, "model.path={d}/model"], "has no weights",
     _edit_model(lambda m: (m / "model.safetensors").unlink())),
    ("model_config_not_json", ["train", *TRAIN, "model.path={d}/model"], "config.json is not valid JSON",
     _edit_model(lambda m: (m / "config.json").write_text('{"model_type": "llama",'))),
    ("model_config_other_size", ["train", *TRAIN, "model.path={d}/model"], "but config.json's LlamaForCausalLM expects",
     _edit_model(_config(intermediate_size=48))),
    ("model_shard_missing", ["train", *TRAIN, "model.path={d}/model"], "is missing (named by model.safetensors.index",
     _edit_model(_shard_index)),
    ("model_type_unknown", ["train", *TRAIN, "model.path={d}/model"], "cannot be read by transformers",
     _edit_model(_config(model_type="no_such_arch"))),
    ("model_path_is_run_dir", ["eval", "model.path={d}/run", *TINY], "is a zo-deepspeed run directory", _run),
    ("model_path_is_file", ["train", *TRAIN, "model.path={d}/m.bin"], "is not an HF model folder (is a file)",
     _write(**{"m.bin": "x"})),
    ("replay_model_config_bert", ["replay", "--model", "{d}/model", "--log", "{d}/run/trajectory.jsonl", "--out",
                                  "{d}/out"], "describes a BertLMHeadModel",
     _both(_run, _edit_model(_config(model_type="bert")))),
    # -- config values of the wrong type (typed config: coerced by field type) -----------------------------------
    ("config_int_given_string", ["train", "--config", "{d}/r.yaml", *TRAIN], "train.steps='ten' is not an integer",
     _write(**{"r.yaml": "train:\n  steps: ten\n"})),
    ("config_int_given_list", ["train", "--config", "{d}/r.yaml", *TRAIN], "train.batch_size=[4, 8]",
     _write(**{"r.yaml": "train:\n  batch_size: [4, 8]\n"})),
    ("config_int_given_null", ["train", "--config", "{d}/r.yaml", *TRAIN], "train.save_every=null is not allowed",
     _write(**{"r.yaml": "train:\n  save_every: null\n"})),
    ("config_int_given_float", ["train", *TRAIN, "train.batch_size=2.5"], "write a whole number (2 or 3)", None),
    ("config_bool_given_int", ["train", "--config", "{d}/r.yaml", *TRAIN], "train.export=1 is not a boolean",
     _write(**{"r.yaml": "train:\n  export: 1\n"})),
    ("config_str_given_number", ["train", "--config", "{d}/r.json", *TRAIN], "data.task=3 is not a string",
     _write(**{"r.json": {"data": {"task": 3}}})),
    ("config_float_given_bool", ["train", "--config", "{d}/r.yaml", *TRAIN], "zo.lr=true is not a number",
     _write(**{"r.yaml": "zo:\n  lr: true\n"})),
    ("config_literal_unknown", ["train", *TRAIN, "model.dtype=fp32"], "model.dtype='fp32'; use one of", None),
    ("config_unknown_suffix", ["train", "--config", "{d}/r.txt", *TRAIN], "unknown suffix '.txt'",
     _write(**{"r.txt": "{}"})),
    ("config_not_utf8", ["train", "--config", "{d}/r.yaml", *TRAIN], "r.yaml:2: not UTF-8",
     _write(**{"r.yaml": b"train:\n  steps: \xe9\n"})),
    ("config_is_directory", ["train", "--config", "{d}/r.yaml", *TRAIN], "Is a directory", _write(**{"r.yaml/x": ""})),
    ("ds_config_not_utf8", ["train", "--ds-config", "{d}/ds.json", *TRAIN], "ds.json:1: not UTF-8",
     _write(**{"ds.json": b"{\"a\xff\": 1}\n"})),
    # -- data: no silent choice, every malformed line named ------------------------------------------------------
    ("data_two_files_for_one_split", ["train", *TRAIN, *SST2], "holds train.jsonl and train.csv",
     _write(**{"data/train.jsonl": ROWS, "data/train.csv": "sentence,label\nok,1\n", "data/val.jsonl": ROWS})),
    ("data_rte_boolean_labels", ["train", *TRAIN, "data.task=rte", "data.data_dir={d}/data"],
     "label true (a boolean) has no meaning for rte", _rte(True)),
    ("data_jsonl_bad_line", ["train", *TRAIN, *SST2], "train.jsonl: line 3: not JSON",
     _write(**{"data/train.jsonl": "".join(ROWS.splitlines(True)[:2]) + '{"sentence": "x", \n' + ROWS,
               "data/val.jsonl": ROWS})),
    ("data_not_utf8", ["train", *TRAIN, *SST2], "line 2: not UTF-8",
     _write(**{"data/train.jsonl": ROWS.split("\n")[0].encode() + b"\n\xff\xfe\n", "data/val.jsonl": ROWS})),
    ("eval_every_without_dev", ["train", *TRAIN, "data.num_dev=0", "train.steps=4", "train.eval_every=2"],
     "has no dev examples (data.num_dev=0)", None),
    ("train_without_test_examples", ["train", *TRAIN, "data.num_test=0"], "no test examples", None),
    ("eval_without_test_examples", ["eval", "model.path={m}", *TINY, "data.num_test=0"], "no test examples", None),
]


@pytest.fixture(scope="module")
def ctx(tiny_lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    other = root / "model_other"  # the tiny model's architecture and tokenizer, other weights
    tiny_llama(seed=2, like=tiny_lm_dir, save_to=other)
    for f in tiny_lm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, other / f.name)
    template = root / "template"  # checkpoints after steps 2 and 3; the log holds steps 0, 1, 2
    run_cli(["train", f"model.path={tiny_lm_dir}", *TINY, "train.steps=3", "train.save_every=2",
             f"train.output_dir={template}"], cwd=root)
    return {"root": root, "m": tiny_lm_dir, "other": other, "template": template}


@pytest.fixture(scope="module")
def results(ctx):
    """Every case in one driver process: {id: (rc, stderr, folder, snapshot before)}."""
    root = ctx["root"]
    cases = root / "cases"
    cases.mkdir()
    spec, before = [], {}
    model_before = snapshot(ctx["m"])
    for cid, argv, _, prep in CASES:
        d = cases / cid
        d.mkdir()
        if prep is not None:
            prep(d, ctx)
        before[cid] = snapshot(d)
        spec.append([cid, [a.format(m=ctx["m"], d=d, other=ctx["other"]) for a in argv]])
    cwd_before = sorted(p.name for p in cases.iterdir())
    out = run_cases(spec, cases)
    assert snapshot(ctx["m"]) == model_before, "a case wrote into the shared model folder"
    new = sorted(set(p.name for p in cases.iterdir()) - set(cwd_before) - {"out.json", "spec.json"})
    assert not new, f"written into the cwd: {new}"
    if os.environ.get("ZO_GUARD_TABLE"):  # the case table of a report: id, command, exit status, the error line
        rows = ["| case | command | exit | error line |", "|---|---|---|---|"]
        for cid, argv, *_ in CASES:
            rc, err = out[cid][0], out[cid][1]
            line = next((ln for ln in err.splitlines() if ": error:" in ln), err.strip()[-200:])
            rows.append(f"| {cid} | `zo-deepspeed {' '.join(argv)}` | {rc} | {line.replace('|', '/')} |")
        Path(os.environ["ZO_GUARD_TABLE"]).write_text("\n".join(rows) + "\n")
    return {cid: (out[cid][0], out[cid][1], cases / cid, before[cid]) for cid, *_ in CASES}


@pytest.mark.parametrize("cid,argv,needle,prep", CASES, ids=[c[0] for c in CASES])
def test_refused_with_one_line_and_nothing_written(cid, argv, needle, prep, results):
    rc, err, folder, before = results[cid]
    line = one_error_line(argv[0], rc, err)
    assert needle in line, line
    assert snapshot(folder) == before, "the refused command changed its folder"


# -- resume over a damaged log: repaired (and said so), then replay == the run's weights ---------------------
REPAIRS = {
    # the log's last line torn by a crash while step 3 was written (after the step-3 checkpoint)
    "torn_last_line": lambda run, ls: ls + [ls[-1][:37]],
    # a crash after step 3's record, before its checkpoint: the newest checkpoint is step 2's
    "record_after_checkpoint": lambda run, ls: (_latest(run, 2), ls)[1],
    # records after the checkpoint of which one is damaged: dropped with them, they run again
    "damaged_after_checkpoint": lambda run, ls: (_latest(run, 2), ls[:3] + [ls[3][:25], ls[3]])[1],
    # no checkpoint at all but 3 logged steps: the steps run again from the base weights
    "no_checkpoint": lambda run, ls: (shutil.rmtree(run / "checkpoints"), ls)[1],
}


def _latest(run: Path, step: int) -> None:
    ck = run / "checkpoints"
    shutil.rmtree(ck / "step_00000003")
    (ck / "latest").write_text(f"step_{step:08d}")


def test_resume_repairs_a_damaged_log_and_its_replay_equals_the_weights(ctx, tmp_path):
    spec = []
    for name, damage in REPAIRS.items():
        run = tmp_path / name
        shutil.copytree(ctx["template"], run)
        log = run / "trajectory.jsonl"
        log.write_text("".join(line + "\n" for line in damage(run, log.read_text().splitlines())))
        spec.append([name, ["train", "--resume", f"train.output_dir={run}", "train.steps=4"]])
    out = run_cases(spec, tmp_path)
    ref_records = read_trajectory(ctx["template"] / "trajectory.jsonl")[1]
    for name in REPAIRS:
        rc, err, std = out[name]
        assert rc == 0, f"{name}: exit {rc}\n{err[-3000:]}"
        run = tmp_path / name
        said = [ln for ln in std.splitlines() if ln.startswith("[zo_deepspeed] resume:")]
        if name == "no_checkpoint":
            assert any("the log's 3 step(s) run again from the base weights" in ln for ln in said), said
        else:
            assert any("dropped the" in ln for ln in said), said
            if name != "record_after_checkpoint":
                assert any("torn record" in ln or "damaged" in ln for ln in said), said
        _, records = read_trajectory(run / "trajectory.jsonl")  # whole and contiguous
        assert [r.step for r in records] == [0, 1, 2, 3], name
        assert [(r.seeds, r.example_ids) for r in records[:3]] == [(r.seeds, r.example_ids) for r in ref_records]
        live = hf_weights(run / "export")
        rep = {k: v.detach() for k, v in replayed(ctx["m"], run / "trajectory.jsonl").state_dict().items()}
        for k in live:
            assert torch.allclose(live[k], rep[k], rtol=1e-6, atol=1e-6), f"{name}: {k}"


# -- Ctrl-C ---------------------------------------------------------------------------------------------------
def test_ctrl_c_checkpoints_exits_130_and_resumes(ctx, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "zo_deepspeed", "train", f"model.path={ctx['m']}", *TINY, "train.steps=40",
           f"train.output_dir={run}"]
    p = subprocess.Popen(cmd, env=repo_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=tmp_path)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:  # wait until a step has been logged
        if (run / "trajectory.jsonl").exists() and len((run / "trajectory.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 130, f"exit {p.returncode}\n{out[-2000:]}\n{err[-2000:]}"
    assert "Traceback" not in err and "SIGINT: checkpoint at step" in out, out[-2000:]
    step = int(out.split("SIGINT: checkpoint at step ")[1].split()[0])
    assert step < 40 and (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"
    assert len(read_trajectory(run / "trajectory.jsonl")[1]) == step
    p2 = run_cli(["train", "--resume", f"train.output_dir={run}", f"train.steps={step + 1}"], cwd=tmp_path)
    assert f"loaded step_{step:08d}" in p2.stdout
    assert len(read_trajectory(run / "trajectory.jsonl")[1]) == step + 1


# -- units: the guard, the model-file checks, the log ---------------------------------------------------------
def test_guard_units(tmp_path, tiny_lm_dir, monkeypatch):
    from zo_deepspeed.guard import (MARKER, OutputRefused, check_output_dir, check_output_file, check_run_dir,
                                    is_run_dir)

    monkeypatch.chdir(tmp_path)
    assert check_run_dir("new/run") == tmp_path / "new" / "run"
    (tmp_path / "empty").mkdir()
    check_run_dir("empty")
    (tmp_path / "leftover").mkdir()
    (tmp_path / "leftover" / ".lock").write_text("")
    assert is_run_dir(tmp_path / "leftover")  # what a start leaves before its config.json: still ours
    for bad, needle in [("", "is empty"), (".", "current directory"), ("..", "current directory"),
                        ("/", "current directory"), (str(tiny_lm_dir), "model folder")]:
        with pytest.raises(OutputRefused, match=needle):
            check_run_dir(bad)
    ours = tmp_path / "exp"
    ours.mkdir()
    (ours / MARKER).write_text("{}")
    (ours / "model.safetensors").write_text("old")
    check_output_dir(ours, "--out")  # an export of ours is replaced
    (tmp_path / "wrap" / "base").mkdir(parents=True)
    with pytest.raises(OutputRefused, match="contains the base model"):
        check_output_dir(tmp_path / "wrap", "--out", inputs=[("base model", tmp_path / "wrap" / "base")])
    with pytest.raises(OutputRefused, match="is a model folder"):
        check_output_dir(tiny_lm_dir, "--out")
    (tmp_path / "c.png").write_bytes(b"\x89PNG\r\n")
    check_output_file(tmp_path / "c.png", "--out")  # a PNG is replaced by a PNG
    check_output_file(tmp_path / "c.svg", "--out")
    with pytest.raises(OutputRefused, match="does not exist"):
        check_output_file(tmp_path / "nope" / "c.png", "--out")


def test_model_checks_accept_real_layouts(tiny_lm_dir, tmp_path):
    """What transformers loads must pass: a tied lm_head absent from the file, a sharded index, a .bin,
    and a base-model checkpoint without the *ForCausalLM prefix; an OPT model (other architecture)."""
    from safetensors.torch import load_file, save_file

    from zo_deepspeed.modelcheck import check_model_files

    check_model_files(tiny_lm_dir)
    sd = load_file(str(tiny_lm_dir / "model.safetensors"))
    names = sorted(sd)
    for layout in ("sharded", "bin", "no_prefix"):
        m = tmp_path / layout
        m.mkdir()
        shutil.copy(tiny_lm_dir / "config.json", m / "config.json")
        if layout == "sharded":
            half = len(names) // 2
            save_file({k: sd[k] for k in names[:half]}, str(m / "a.safetensors"))
            save_file({k: sd[k] for k in names[half:]}, str(m / "b.safetensors"))
            wmap = {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}
            (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
        elif layout == "bin":
            torch.save(sd, m / "pytorch_model.bin")
        else:
            save_file({k.removeprefix("model."): v for k, v in sd.items()}, str(m / "model.safetensors"))
        check_model_files(m)
    from harness import tiny_opt

    tiny_opt(save_to=tmp_path / "opt")
    check_model_files(tmp_path / "opt")


def test_model_checks_refuse_a_missing_or_extra_tensor(tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from zo_deepspeed.modelcheck import ModelFileError, check_model_files

    sd = load_file(str(tiny_lm_dir / "model.safetensors"))
    for name, tensors, needle in [("missing", {k: v for k, v in sd.items() if "layers.1.mlp.up_proj" not in k},
                                   "1 of its 21 tensors are not in the weights (e.g. model.layers.1.mlp.up_proj"),
                                  ("extra", {**sd, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)},
                                   "1 tensors of the weights are not in it")]:
        m = tmp_path / name
        m.mkdir()
        shutil.copy(tiny_lm_dir / "config.json", m / "config.json")
        save_file(tensors, str(m / "model.safetensors"))
        with pytest.raises(ModelFileError, match=needle.replace("(", r"\(")):
            check_model_files(m)


def _header_and_records(tmp_path: Path, n: int = 4) -> Path:
    from zo_deepspeed.trajectory import LogHeader, StepRecord, TrajectoryLog

    path = tmp_path / "trajectory.jsonl"
    log = TrajectoryLog(path, LogHeader(zo={**ZO_EAGER}, restore="inplace"))
    for t in range(n):
        log.append(StepRecord(t, (t + 10,), (0.5,), 1e-3, 0.0, 1e-3, 1.0, 0.9, update=((t + 10, -5e-4),)))
    return path


@pytest.mark.parametrize("damage,step,outcome", [
    (lambda ls: ls + [ls[-1][:20]], 4, "repaired"),                       # torn last line
    (lambda ls: ls[:3] + [ls[3][:20]] + ls[4:], 2, "repaired"),           # damaged line after the checkpoint
    (lambda ls: ls[:2] + [ls[2][:20]] + ls[3:], 3, "corrupt record"),     # damaged line before it
    (lambda ls: ls[:3], 3, "holds 2 step"),                               # shorter than the checkpoint
    (lambda ls: ls[:2] + ls[3:], 3, "not contiguous"),                    # a gap before the checkpoint
    (lambda ls: ls[:2] + ls[3:], 1, "repaired"),                          # a gap after it: dropped
    (lambda ls: [ls[0][:9]] + ls[1:], 0, "header is not JSON"),
])
def test_truncate_repairs_only_what_follows_the_checkpoint(tmp_path, damage, step, outcome):
    from zo_deepspeed.trajectory import LogError, read_log, truncate

    path = _header_and_records(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in damage(lines)))
    before = path.read_bytes()
    if outcome != "repaired":
        with pytest.raises(LogError, match=outcome):
            truncate(path, step)
        assert path.read_bytes() == before  # a refusal rewrites nothing
        return
    tail = truncate(path, step)
    assert tail.dropped > 0 and tail.describe(path, step)
    assert path.read_text().splitlines() == lines[:1 + step]
    assert len(read_log(path).records) == step


def test_checkpoint_digest_refuses_another_runs_log(tmp_path):
    from zo_deepspeed.trajectory import LogError, check_against_checkpoint, read_log, records_digest

    path = _header_and_records(tmp_path)
    records = read_log(path).records
    check_against_checkpoint(path, records, 3, records_digest(records[:3]), "step_00000003")
    other = [records[0], records[1].__class__(**{**records[1].__dict__, "g": (0.25,)}), *records[2:]]
    with pytest.raises(LogError, match="not the ones checkpoint step_00000003 was trained with"):
        check_against_checkpoint(path, other, 3, records_digest(records[:3]), "step_00000003")


def test_undo_of_a_refused_start_removes_only_what_it_created(tmp_path):
    from zo_deepspeed.trainer import RunDirUndo

    run = tmp_path / "a" / "b" / "run"
    u = RunDirUndo(run)
    run.mkdir(parents=True)
    (run / ".lock").write_text("")
    u.armed = True
    u.undo()
    assert not (tmp_path / "a").exists()  # the folders made for the run, not their parent
    keep = tmp_path / "keep"
    (keep / "monitor").mkdir(parents=True)
    (keep / "metrics.jsonl").write_text("{}\n")
    u = RunDirUndo(keep)
    (keep / "monitor" / "events.new").write_text("x")
    (keep / ".lock").write_text("")
    u.undo()  # not armed: the lock was never taken, nothing is removed
    assert (keep / ".lock").exists()
    u.armed = True
    u.undo()
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*")) == ["metrics.jsonl", "monitor"]


if __name__ == "__main__":  # pragma: no cover
    os.execv(sys.executable, [sys.executable, "-m", "pytest", "-q", __file__])


@pytest.mark.parametrize("exc,code,needle", [
    (OSError(28, "No space left on device", "/runs/x/checkpoints/step_3"), 2,
     "No space left on device: /runs/x/checkpoints/step_3; free some space"),
    (OSError(30, "Read-only file system", "/ro/run/.lock"), 2, "Read-only file system: /ro/run/.lock; the file system"),
    (IsADirectoryError(21, "Is a directory", "/data/train.jsonl"), 2, "it is a directory where a file is expected"),
    (NotADirectoryError(20, "Not a directory", "/a_file/run"), 2, "a part of it is a file where a directory"),
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
])
def test_cli_one_error_path(monkeypatch, capsys, exc, code, needle):
    """Expected failures (the file system, Ctrl-C outside the loop) end as one line; a bug keeps its traceback."""
    from zo_deepspeed import cli

    def boom(args):
        raise exc

    monkeypatch.delenv("ZO_DEEPSPEED_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_plot", boom)
    assert cli.main(["plot", "--run-dir", "x"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zo-deepspeed plot: ") and needle in err[0], err


def test_cli_unexpected_errors_keep_their_traceback(monkeypatch):
    from zo_deepspeed import cli

    def bug(args):
        return {}["seeds"]

    monkeypatch.setattr(cli, "_plot", bug)
    with pytest.raises(KeyError):
        cli.main(["plot", "--run-dir", "x"])
