"""metrics.jsonl on resume (zo_deepspeed.monitor): cut back to the checkpoint so that each step's record is
there once, whatever stretches the run went through. Plain files, no DeepSpeed."""
import json

import pytest

from zo_deepspeed.monitor import read_metrics, truncate


def _write(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)


def _first_stretch():
    """A run of 6 steps (dev every 3, zero-shot test, final test and test at best dev), then a second start
    that crashed in step 5 after writing its truncation record and steps 4-5 again."""
    return ([{"step": 0, "truncated_train": 0}, {"step": 0, "test/accuracy": 0.5}]
            + [{"step": s, "loss": 1.0 / s, "g": 0.1} for s in (1, 2, 3)] + [{"step": 3, "dev/accuracy": 0.6}]
            + [{"step": s, "loss": 1.0 / s, "g": 0.1} for s in (4, 5, 6)] + [{"step": 6, "dev/accuracy": 0.55}]
            + [{"step": 6, "test/accuracy": 0.58}, {"step": 3, "test_at_best/accuracy": 0.61}]
            + [{"step": 3, "truncated_train": 0}, {"step": 4, "loss": 0.25, "g": 0.1}])


def test_truncate_keeps_the_steps_up_to_the_checkpoint_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = _first_stretch()
    _write(path, recs, tail='{"step": 5, "lo')  # a torn last line: a crash mid-write
    assert truncate(path, 3) == len(recs) - 5 + 1
    kept, torn = read_metrics(path)
    assert not torn
    # the zero-shot test (not rerun from step 3), steps 1-3 and the dev evaluation at 3; the starts'
    # truncation counts and the finished stretch's test results go (the resumed run writes them again)
    assert kept == [recs[1], *recs[2:6]]


def test_truncate_from_the_base_weights_drops_the_zero_shot_too(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, _first_stretch())
    truncate(path, 0)
    assert read_metrics(path) == ([], False)


def test_truncate_leaves_a_clean_log_and_a_missing_one_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate(path, 3) == 0 and not path.exists()
    recs = [{"step": 1, "loss": 1.0, "g": 0.1}, {"step": 2, "loss": 0.5, "g": 0.1}]
    _write(path, recs)
    before = path.stat().st_mtime_ns
    assert truncate(path, 2) == 0 and path.stat().st_mtime_ns == before and read_metrics(path) == (recs, False)


def test_a_damaged_line_inside_the_log_refuses_with_its_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, lo\n{"step": 3, "loss": 0.3}\n')
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record.*delete that line"):
        truncate(path, 1)
    assert path.read_bytes() == before
    path.write_text('[1]\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a metrics record"):
        read_metrics(path)
