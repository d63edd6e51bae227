"""Config trees: defaults, file + dotted overrides, and one clear error per mistake."""
import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest

from zo_deepspeed import ZOConfig
from zo_deepspeed.run_config import TrainConfig, load_run_config, load_saved_run_config, resolve_run_config
from zo_deepspeed.trajectory import LogHeader, StepRecord, TrajectoryLog, read_log

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kw,needle", [
    ({"eps": 0.0}, "zo.eps must be > 0"), ({"eps": -1e-3}, "zo.eps must be > 0"), ({"lr": -1.0}, "zo.lr must be >= 0"),
    ({"q": 0}, "zo.q must be an integer >= 1"), ({"distribution": "uniform"}, "zo.distribution"), ({"restore": "x"}, "zo.restore"),
    ({"lr": float("nan")}, "finite"), ({"base_device": "gpu"}, "zo.base_device"), ({"seed": -1}, "zo.seed"),
])
def test_zo_config_rejects(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ZOConfig(**kw)


def test_run_config_file_then_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("zo:\n  lr: 1.0e-6\n  q: 2\ntrain:\n  steps: 7\n")
    cfg = load_run_config(p, ["train.steps=9", "zo.distribution=rademacher", "train.zero_shot_eval=false",
                              "deepspeed=ds.json"])
    assert (cfg.zo.lr, cfg.zo.q, cfg.zo.distribution) == (1e-6, 2, "rademacher")
    assert cfg.train.steps == 9 and cfg.train.zero_shot_eval is False and cfg.deepspeed == "ds.json"
    assert json.loads(json.dumps(cfg.to_dict()))["zo"]["q"] == 2  # serializable as written to the run dir


@pytest.mark.parametrize("text,overrides,needle", [
    ("zo:\n  lrr: 1\n", [], "unknown key"),
    ("optim:\n  lr: 1\n", [], "unknown config section 'optim'"),
    ("zo: [1, 2]\n", [], "must be a mapping"),
    ("zo: {lr: 1e-6\n", [], "does not parse"),
    ("", ["train.steps"], "section.key=value"),
    ("", ["train.steps=ten"], "train.steps"),
    ("", ["nosuch.key=1"], "section one of"),
    ("", ["train.objective=magic"], "train.objective"),
])
def test_run_config_errors(tmp_path, text, overrides, needle):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=needle):
        load_run_config(p, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")


def test_trajectory_log_drops_a_torn_last_record_only(tmp_path):
    path = tmp_path / "t.jsonl"
    log = TrajectoryLog(path, LogHeader(zo={}, restore="inplace"))
    for t in range(3):
        log.append(StepRecord(t, (t + 10,), (0.5,), 1e-3, 0.0, 1e-3, 1.0, 0.9))
    with open(path, "a") as f:
        f.write('{"step": 3, "seeds": [1')  # a crash mid-write
    _, recs = read_log(path)
    assert [r.step for r in recs] == [0, 1, 2] and recs[1].seeds == (11,)
    lines = path.read_text().splitlines()
    lines.insert(2, "garbage")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="corrupt record"):
        read_log(path)


# -- coercion by field type (YAML/JSON values and section.key=value overrides) -------------------------
def _load_yaml(tmp_path, text, overrides=()):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return load_run_config(p, list(overrides))


def _refused(tmp_path, text, overrides=()):
    with pytest.raises(ValueError) as e:
        _load_yaml(tmp_path, text, overrides)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg  # one line
    return msg


def test_yaml_booleans_are_booleans_or_true_false_strings(tmp_path):
    cfg = _load_yaml(tmp_path, 'train:\n  export: "false"\n  zero_shot_eval: "TRUE"\n')
    assert cfg.train.export is False and cfg.train.zero_shot_eval is True
    assert _load_yaml(tmp_path, "train:\n  export: no\n").train.export is False  # YAML 1.1's own boolean
    for text in ('train:\n  zero_shot_eval: "no"\n', "train:\n  export: 1\n", 'train:\n  export: "yes"\n'):
        msg = _refused(tmp_path, text)
        assert "is not a boolean; write true or false" in msg and msg.startswith("train."), msg


def test_integers_refuse_fractions_and_strings_from_files(tmp_path):
    msg = _refused(tmp_path, "train:\n  steps: 2.6\n")
    assert msg.startswith("train.steps=2.6 is not an integer") and "2 or 3" in msg, msg
    assert _load_yaml(tmp_path, "train:\n  steps: 3.0\n").train.steps == 3
    assert "write 1000" in _refused(tmp_path, "train:\n  steps: 1e3\n")  # a string to PyYAML
    assert "train.steps=true" in _refused(tmp_path, "train:\n  steps: true\n")
    assert _load_yaml(tmp_path, "", ["train.steps=3"]).train.steps == 3  # command line: text
    assert "2 or 3" in _refused(tmp_path, "", ["train.steps=2.6"])


def test_yaml_exponent_without_dot_is_read_with_a_note(tmp_path, capsys):
    cfg = _load_yaml(tmp_path, "zo:\n  lr: 1e-5\n  eps: 1.0e-3\n")
    assert cfg.zo.lr == 1e-5 and isinstance(cfg.zo.lr, float) and cfg.zo.eps == 1e-3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zo.lr" in err[0] and "1.0e-5" in err[0], err
    assert "zo.lr='fast' is not a number" in _refused(tmp_path, "zo:\n  lr: fast\n")


@pytest.mark.parametrize("text,needle", [
    ("zo:\n  lr: null\n", "zo.lr=null is not allowed"),
    ("train:\n  steps: ~\n", "train.steps=null is not allowed"),
    ("model:\n  path: null\n", "model.path=null is not allowed"),
    ("zo:\n  lr: [1.0e-5, 2.0e-5]\n", "zo.lr=[1e-05, 2e-05] is not a number"),
    ("adapter:\n  lora_targets: [q_proj, v_proj]\n", "adapter.lora_targets=['q_proj', 'v_proj'] is not a string"),
    ("train:\n  steps: [1]\n", "train.steps=[1] is not an integer"),
    ("train:\n  export: {a: 1}\n", "train.export={'a': 1} is not a boolean"),
    ("zo:\n  restore: 3\n", "zo.restore=3; use one of auto, inplace, master, backup"),
    ("adapter:\n  mode: no\n", "adapter.mode=false; use one of none, lora, prefix"),
    ("deepspeed: 5\n", "deepspeed=5 is not a string"),
])
def test_wrong_types_are_one_line_naming_key_value_and_fix(tmp_path, text, needle):
    assert needle in _refused(tmp_path, text)


def test_null_only_where_optional(tmp_path):
    cfg = _load_yaml(tmp_path, "data:\n  data_dir: null\ndeepspeed: null\n", ["data.data_dir=none"])
    assert cfg.data.data_dir is None and cfg.deepspeed is None
    cfg = load_run_config(None, ["adapter.mode=none"])  # 'none' is a member here, not null
    assert cfg.adapter.mode == "none"


def test_command_line_boolean_spellings():
    for text, want in [("false", False), ("True", True), ("no", False), ("on", True), ("0", False), ("1", True)]:
        assert load_run_config(None, [f"train.export={text}"]).train.export is want
    with pytest.raises(ValueError, match=r"train.export='maybe' is not a boolean; write true or false \(or yes/no"):
        load_run_config(None, ["train.export=maybe"])


def test_constructor_checks_types_too():
    for kw, needle in [({"q": "3"}, "zo.q='3' is not an integer"), ({"q": 2.0}, "zo.q=2.0 is not an integer"),
                       ({"fuse_update": 1}, "zo.fuse_update=1 is not a boolean"),
                       ({"lr": "1e-5"}, "zo.lr='1e-5' is not a number"), ({"restore": None}, "zo.restore=null")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            ZOConfig(**kw)
    with pytest.raises(ValueError, match="train.steps='4' is not an integer"):
        TrainConfig(steps="4")


@pytest.mark.parametrize("name", ["run.txt", "run.cfg", "run"])
def test_config_file_of_unknown_suffix_is_refused(tmp_path, name):
    p = tmp_path / name
    p.write_text('{"train": {"steps": 3}}')
    with pytest.raises(ValueError, match=r"unknown suffix .*name it .yaml/.yml \(YAML\) or .json"):
        load_run_config(p)
    (tmp_path / "run.json").write_text('{"train": {"steps": 3}}')
    assert load_run_config(tmp_path / "run.json").train.steps == 3


def test_choices_come_from_the_literals():
    from typing import get_args

    from zo_deepspeed import rng, variants
    from zo_deepspeed.adapters import ADAPTER_MODES, AdapterMode
    from zo_deepspeed.config import RESTORE_MODES, Restore
    from zo_deepspeed.planner.cli import add_arguments
    from zo_deepspeed.typed import choices, field_types

    assert RESTORE_MODES == get_args(Restore) == choices(field_types(ZOConfig)["restore"])
    assert ADAPTER_MODES == get_args(AdapterMode) and rng.DISTRIBUTIONS == choices(field_types(ZOConfig)["distribution"])
    assert variants.OPTIMIZERS == choices(field_types(ZOConfig)["optimizer"])
    assert choices(field_types(TrainConfig)["objective"]) == ("auto", "loss", "choice", "accuracy", "f1")
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    restore = next(a for a in ap._actions if a.dest == "restore")
    assert tuple(restore.choices) == RESTORE_MODES


# -- the frozen tree and its one resolve step --------------------------------------------------------
def test_the_tree_is_frozen():
    cfg = load_run_config()
    for obj, name in [(cfg, "zo"), (cfg.train, "steps"), (cfg.zo, "lr"), (cfg.model, "path"), (cfg.data, "task"),
                      (cfg.adapter, "mode")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, getattr(obj, name))
    assert dataclasses.replace(cfg.train, steps=3).steps == 3 and cfg.train.steps == 40


def test_resolve_fills_objective_by_task_kind_and_total_steps():
    cfg = resolve_run_config(load_run_config(None, ["train.steps=12"]))
    assert (cfg.train.objective, cfg.zo.total_steps) == ("choice", 12)  # rotten_tomatoes: classification
    gen = resolve_run_config(load_run_config(None, ["data.task=squad"]))
    assert (gen.train.objective, gen.zo.total_steps) == ("loss", 40)
    explicit = load_run_config(None, ["train.objective=accuracy", "zo.total_steps=100", "zo.perturb=forward",
                                      "data.num_train=8", "data.num_dev=4", "data.num_test=4", "data.test_seed=0",
                                      "data.max_length=64", "data.max_new_tokens=8"])  # the task's data.*: set too
    assert resolve_run_config(explicit) is explicit  # nothing to fill: the same tree
    assert resolve_run_config(cfg) is cfg  # idempotent
    raw = load_run_config()
    assert (raw.train.objective, raw.zo.total_steps) == ("auto", 0)  # resolving made a new tree


# -- zo.dist -> zo.distribution -------------------------------------------------------------------------
def test_old_zo_dist_key_is_read_with_a_deprecation_line(tmp_path, capsys):
    cfg = load_run_config(None, ["zo.dist=rademacher"])
    assert cfg.zo.distribution == "rademacher" and "dist" not in cfg.to_dict()["zo"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "zo.dist is deprecated" in err[0] and "zo.distribution" in err[0], err
    assert _load_yaml(tmp_path, "zo:\n  dist: rademacher\n").zo.distribution == "rademacher"
    assert "deprecated" in capsys.readouterr().err
    assert "are the same key" in _refused(tmp_path, "zo:\n  dist: rademacher\n  distribution: gaussian\n")


def test_old_log_header_dist_is_read_silently(capsys):
    header = json.loads((REPO / "bench/long_run/zo_full/trajectory.jsonl").open().readline())
    assert header["zo"]["dist"] == "gaussian"  # a log written before the rename
    assert ZOConfig.from_dict(header["zo"]).distribution == "gaussian"
    assert ZOConfig.from_dict({**header["zo"], "dist": "rademacher"}).distribution == "rademacher"
    assert capsys.readouterr().err == ""


def test_replay_of_an_old_log_uses_its_distribution(tmp_path):
    import torch

    import zo_deepspeed as zd

    def model():
        torch.manual_seed(0)  # test code
        return torch.nn.Linear(4, 3)

    log = tmp_path / "old.jsonl"
    TrajectoryLog(log, LogHeader(zo={"lr": 1e-2, "eps": 1e-3, "dist": "rademacher", "compile": False},
                                 restore="inplace"))
    rec = StepRecord(0, (5,), (0.5,), 1e-2, 0.0, 1e-3, 1.0, 0.9, update=((5, -1e-2 * 0.5),), decay=0.0)
    TrajectoryLog(log).append(rec)
    eng = zd.replay(model(), log)
    eng.flush()
    assert eng.zo.distribution == "rademacher"
    delta = (eng.module.weight.detach() - model().weight.detach()).abs()
    assert torch.allclose(delta, torch.full_like(delta, 0.5e-2))  # rademacher: every |z| = 1


# -- saved configs: read in memory ---------------------------------------------------------------------
def _saved_run(tmp_path, **zo):
    run = tmp_path / "run"
    run.mkdir()
    tree = load_run_config(None, [f"train.output_dir={run}", "train.steps=7"]).to_dict()
    tree["zo"].update(zo)
    (run / "config.json").write_text(json.dumps({**tree, "resolved_ds_config": {"zero_optimization": {}},
                                                 "world_size": 2}))
    return run


def _files(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_resume_config_load_writes_nothing_into_the_run_dir(tmp_path):
    from zo_deepspeed.cli import _load_cfg

    run = _saved_run(tmp_path)
    before = _files(run)
    args = argparse.Namespace(config=None, ds_config=None, overrides=[f"train.output_dir={run}", "train.steps=9"])
    cfg = _load_cfg(args, resume=True)
    assert (cfg.train.steps, cfg.train.output_dir) == (9, str(run))
    assert _files(run) == before


def test_saved_config_ignores_exactly_the_trainers_additions(tmp_path, capsys):
    run = _saved_run(tmp_path, dist="rademacher")  # a config.json written before the rename
    raw = json.loads((run / "config.json").read_text())
    del raw["zo"]["distribution"]
    (run / "config.json").write_text(json.dumps(raw))
    cfg = load_saved_run_config(run, ["zo.q=2"])
    assert (cfg.train.steps, cfg.zo.q, cfg.zo.distribution) == (7, 2, "rademacher")
    assert "zo.dist is deprecated" in capsys.readouterr().err
    (run / "config.json").write_text(json.dumps({**raw, "extra": 1}))
    with pytest.raises(ValueError, match="unknown config section 'extra'"):
        load_saved_run_config(run)


# -- --help: every key documented ----------------------------------------------------------------------
def test_help_shows_every_key_with_default_and_docstring():
    from harness import run_cli

    from zo_deepspeed.run_config import SECTIONS, RunConfig
    from zo_deepspeed.typed import field_docs

    out = run_cli(["train", "--help"]).stdout
    defaults = RunConfig()
    for sec, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            doc = docs[f.name]
            assert doc.strip(), f"{sec}.{f.name} has no docstring"
            assert f"  {sec}.{f.name} = " in out, f"{sec}.{f.name} missing from --help"
            assert doc.splitlines()[0] in out, f"{sec}.{f.name}'s docstring missing from --help"
    assert "  zo.lr = 1.0e-05" in out and defaults.zo.lr == 1e-5  # the run's default, not ZOConfig's
    assert "  zo.restore = auto   (auto | inplace | master | backup | none)" in out
    assert field_docs(RunConfig)["deepspeed"].splitlines()[0] in out


def test_cli_refuses_a_fractional_step_count_in_one_line(tmp_path):
    from harness import run_cli

    (tmp_path / "run.yaml").write_text("train:\n  steps: 2.6\n")
    p = run_cli(["train", "--config", str(tmp_path / "run.yaml"), f"train.output_dir={tmp_path / 'run'}"],
                check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert lines[-1].startswith("zo-deepspeed train: error: train.steps=2.6 is not an integer"), lines
    assert not (tmp_path / "run").exists()
