"""The trajectory log as the run's ground truth (trajectory.py owns it) and the engine's one state path.

* every reader verifies the log: another z stream, another base model, a gap in the steps or a file
  that is not a log are refused before any model is built, by the library and by the CLI, which then
  writes nothing;
* resume from a checkpoint's own tensors and resume by replaying the log end in the same
  ``load_state_dict`` and continue exactly like the uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zo_deepspeed as zd
from harness import run_cli
from zo_deepspeed import checkpoint as ckpt
from zo_deepspeed.trajectory import LogError, LogHeader, StepRecord, TrajectoryLog, model_fingerprint, read_log

# master restore: the exact copy of theta is updated by the same fused kernel whether the update comes
# from the live rule or from the log's record, so replay is bitwise (in-place restore is not: a live
# step folds its update into the next +eps pass). Momentum, decay and a schedule make the state matter.
ZO = dict(lr=5e-2, eps=1e-3, weight_decay=0.1, restore="master", optimizer="momentum", momentum_window=3,
          lr_schedule="cosine", total_steps=8, compile=False)


def _model() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def _loss(forward, batch):
    return (forward(batch["x"]) - batch["y"]).square().sum().double(), torch.tensor(float(batch["x"].shape[0]))


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, 6, generator=g), "y": torch.randn(4, 3, generator=g)} for _ in range(n)]


def _engine(log: Path | None = None, **zo):
    return zd.initialize(_model(), None, zd.ZOConfig(**{**ZO, **zo}), loss_fn=_loss, trajectory=log)


def _weights(eng) -> dict:
    eng.flush()
    return {k: v.detach().clone() for k, v in eng.module.named_parameters()}


def test_resume_by_checkpoint_and_by_replay_equal_the_uninterrupted_run(tmp_path):
    batches = _batches(6)
    ref = _engine(tmp_path / "ref.jsonl")
    for t, b in enumerate(batches):
        ref.step(b)
        if t == 2:
            ckpt.save_checkpoint(ref, tmp_path / "run")  # the checkpoint at step 3 (flushes, as any save)
    ref_log = (tmp_path / "ref.jsonl").read_text().splitlines()
    ref_w = _weights(ref)  # flushes: the state below has no pending update
    ref_state = ref.state_dict()
    (tmp_path / "run" / "trajectory.jsonl").write_text("\n".join(ref_log[:4]) + "\n")

    # by checkpoint: the same layout, its own tensors
    a = _engine()
    info = ckpt.resume(a, tmp_path / "run")
    assert (info.how, info.step, a.step_count) == ("checkpoint", 3, 3)
    # by replay: a checkpoint from another world size cannot load its tensors here
    state_file = tmp_path / "run" / "checkpoints" / "step_00000003" / "state.json"
    st = json.loads(state_file.read_text())
    b_run = tmp_path / "run_w2"
    (b_run / "checkpoints" / "step_00000003").mkdir(parents=True)
    (b_run / "checkpoints" / "latest").write_text("step_00000003")
    (b_run / "checkpoints" / "step_00000003" / "state.json").write_text(json.dumps({**st, "world_size": 2}))
    (b_run / "trajectory.jsonl").write_text("\n".join(ref_log) + "\n")  # the log may run ahead of it
    b = _engine()
    info = ckpt.resume(b, b_run)
    assert (info.how, info.step, b.step_count) == ("replay", 3, 3)
    assert a.state_dict() == b.state_dict() == st["engine"]
    assert len(st["engine"]["rule"]["history"]) == 3  # the momentum window is part of the state

    for eng, name in ((a, "a"), (b, "b")):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(ref_log[:4]) + "\n")  # the run's log up to step 3
        eng.open_log(tmp_path / f"{name}.jsonl")
        for batch in batches[3:]:
            eng.step(batch)
        w = _weights(eng)
        assert all(torch.equal(w[k], ref_w[k]) for k in ref_w), f"resume by {name} differs from the uninterrupted run"
        assert eng.state_dict() == ref_state
        # its log continues at step 3 with the uninterrupted run's records, to the digit
        assert (tmp_path / f"{name}.jsonl").read_text().splitlines() == ref_log


def test_replay_of_a_log_rebuilds_the_run_and_continues_it(tmp_path):
    ref = _engine(tmp_path / "log.jsonl")
    for batch in _batches(4):
        ref.step(batch)
    eng = zd.replay(_model(), tmp_path / "log.jsonl")
    w, ref_w = _weights(eng), _weights(ref)
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)
    assert eng.state_dict() == ref.state_dict()


def _log(tmp_path: Path, name: str, **header) -> Path:
    path = tmp_path / name
    log = TrajectoryLog(path, LogHeader(**{"zo": {**ZO, "compile": False}, "restore": "master", **header}))
    for t in range(3):
        log.append(StepRecord(t, (t + 10,), (0.5,), 1e-3, 0.0, 1e-3, 1.0, 0.9, update=((t + 10, -5e-4),)))
    return path


def _rewrite(path: Path, edit) -> Path:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def _foreign_logs(tmp_path: Path, base: Path, other: Path) -> dict[str, tuple[Path, str]]:
    """Logs replay must refuse, each with the phrase of its one-line reason."""
    fp = model_fingerprint(base)

    def stream(lines):
        h = json.loads(lines[0])
        return [json.dumps({**h, "z_stream": "zo_deepspeed.z/0"})] + lines[1:]

    return {
        "z_stream": (_rewrite(_log(tmp_path, "z.jsonl", base_fingerprint=fp), stream), "written with z stream"),
        "base": (_log(tmp_path, "b.jsonl", base_fingerprint=model_fingerprint(other)), "another base model"),
        "gap": (_rewrite(_log(tmp_path, "g.jsonl", base_fingerprint=fp), lambda ls: ls[:2] + ls[3:]),
                "not contiguous"),
        "metrics": (_rewrite(_log(tmp_path, "m.jsonl"), lambda _: ['{"step": 1, "loss": 0.5}']), "not a zo_deepspeed"),
    }


def test_library_replay_refuses_foreign_logs_before_building_a_model(model_dirs, tmp_path):
    built = []

    def factory():
        built.append(1)
        return _model()

    for case, (path, needle) in _foreign_logs(tmp_path, model_dirs["llama"], model_dirs["opt"]).items():
        with pytest.raises(LogError, match=needle):
            zd.replay(factory, path, base=model_dirs["llama"])
        with pytest.raises(LogError, match=needle):
            read_log(path, base=model_dirs["llama"])
        assert not built, f"{case}: a model was built for a log that is refused"


def _snapshot(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_cli_replay_refuses_foreign_logs_and_writes_nothing(tiny_lm_dir, model_dirs, tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    cases = _foreign_logs(logs, tiny_lm_dir, model_dirs["opt"])
    before, model_before = _snapshot(tmp_path), _snapshot(tiny_lm_dir)
    for case, (path, needle) in cases.items():
        p = run_cli(["replay", "--model", str(tiny_lm_dir), "--log", str(path), "--out", str(tmp_path / "out")],
                    check=False, timeout=300)
        err = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2, f"{case}: exit {p.returncode}\n{p.stderr[-2000:]}"
        assert "Traceback" not in p.stderr, f"{case}: {p.stderr[-2000:]}"
        assert len(err) == 1 and "zo-deepspeed replay: error:" in err[0] and needle in err[0], f"{case}: {err}"
    assert _snapshot(tmp_path) == before and _snapshot(tiny_lm_dir) == model_before
