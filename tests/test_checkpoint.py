"""Checkpoint retention on a plain module (no DeepSpeed): train.keep_checkpoints."""
from __future__ import annotations

import torch

import zo_deepspeed as zd
from zo_deepspeed import checkpoint as ckpt


def _engine():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g))
    loss = lambda forward, batch: (forward(batch["x"]).square().sum(), torch.tensor(2.0))  # noqa: E731
    return zd.initialize(model, None, zd.ZOConfig(lr=1e-2, eps=1e-3, compile=False), loss_fn=loss)


def _steps(tmp_path, keep: int) -> list[str]:
    eng = _engine()
    x = {"x": torch.randn(2, 4, generator=torch.Generator().manual_seed(1))}
    for _ in range(4):
        eng.step(x)
        ckpt.save_checkpoint(eng, tmp_path, keep=keep)
    return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())


def test_keep_checkpoints_deletes_all_but_the_newest(tmp_path):
    assert _steps(tmp_path / "k2", keep=2) == ["latest", "step_00000003", "step_00000004"]
    assert (tmp_path / "k2" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert _steps(tmp_path / "k0", keep=0) == ["latest"] + [f"step_{i:08d}" for i in range(1, 5)]
    # what is kept still loads
    eng = _engine()
    info = ckpt.load_checkpoint(eng, tmp_path / "k2" / "checkpoints" / "step_00000003")
    assert info.step == 3 and eng.step_count == 3
