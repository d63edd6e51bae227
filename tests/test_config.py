"""Config trees: defaults, file + dotted overrides, and one clear error per mistake."""
import json

import pytest

from zo_deepspeed import ZOConfig
from zo_deepspeed.run_config import load_run_config
from zo_deepspeed.trajectory import StepRecord, TrajectoryLog, read_log


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
    log = TrajectoryLog(path, header={"zo": {}})
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
