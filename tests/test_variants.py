"""ZO variants: learning-rate schedules, sign and momentum updates, Sparse-MeZO.

Unit tests check each rule against its formula written out by hand; the
multi-rank test checks that every variant at 2 ZeRO-3 ranks equals its
single-process run and that replaying its log reproduces it.
"""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import zo_deepspeed as zd
from harness import Z3, ZO, compare, reference, rel_err, replayed, save_batches, scenario, worker_weights
from zo_deepspeed.rng import stream_key, variates
from zo_deepspeed.sparse import magnitude_thresholds
from zo_deepspeed.variants import UpdateRule, lr_at


def test_lr_schedules():
    assert [lr_at(1.0, "constant", t, 2) for t in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_at(1.0, "linear", t, 0, 4) for t in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cos = [lr_at(2.0, "cosine", t, 2, 6) for t in range(7)]
    assert cos[:3] == [1.0, 2.0, 2.0] and cos[4] == pytest.approx(1.0) and cos[6] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(1.0, "step", 3)


def test_update_rules_by_hand():
    sgd, sign = UpdateRule("sgd"), UpdateRule("sign")
    assert sgd.terms((7, 8), (2.0, -4.0), 0.1) == ((7, -0.1), (8, 0.2))
    assert sign.terms((7, 8), (2.0, -4.0), 0.1) == ((7, -0.05), (8, 0.05))
    mom = UpdateRule("momentum", momentum=0.5, window=2)
    assert mom.terms((1,), (4.0,), 1.0) == ((1, -4.0),)
    assert dict(mom.terms((2,), (2.0,), 1.0)) == {2: -2.0, 1: -2.0}      # 2 + 0.5 * 4
    mom.skip((3,))                                                       # a skipped step: g = 0 in the history
    assert dict(mom.terms((4,), (1.0,), 1.0)) == {4: -1.0}               # window 2: step 2 (g=0) and 4 only
    rebuilt = UpdateRule("momentum", momentum=0.5, window=2)
    rebuilt.rebuild([zd.StepRecord(0, (1,), (4.0,), 1.0, 0.0, 1e-3, 0.0, 0.0),
                     zd.StepRecord(1, (2,), (2.0,), 1.0, 0.0, 1e-3, 0.0, 0.0)])
    assert dict(rebuilt.terms((5,), (1.0,), 1.0)) == {5: -1.0, 2: -1.0}  # the oldest fell out of the window


def _toy():
    g = torch.Generator().manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)
    return m, {"x": x, "y": y}


def _mse(forward, b):
    return ((forward(b["x"]) - b["y"]) ** 2).sum().double(), torch.tensor(float(b["x"].shape[0]))


def test_momentum_step_equals_formula():
    """Three momentum steps on a plain module against theta - lr * sum beta^i g_i z_i written out."""
    m, b = _toy()
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    zo = zd.ZOConfig(lr=1e-2, eps=1e-3, optimizer="momentum", momentum=0.8, momentum_window=2,
                     restore="master", compile=False)
    eng = zd.initialize(m, None, zo, loss_fn=_mse)
    res = [eng.step(b) for _ in range(3)]
    eng.flush()
    for n, p in m.named_parameters():
        z = [variates(stream_key(r.seeds[0], n), 0, p.numel()).view(p.shape) for r in res]
        g = [r.g[0] for r in res]
        upd = (g[0] * z[0]) + (g[1] * z[1] + 0.8 * g[0] * z[0]) + (g[2] * z[2] + 0.8 * g[1] * z[1])  # window 2
        torch.testing.assert_close(p.detach(), theta0[n] - 1e-2 * upd, rtol=0, atol=1e-6)


def test_sparse_thresholds_are_exact_and_split_invariant():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10_001, generator=g)
    x[:50] = 0.25  # ties
    for keep in (0.01, 0.3, 0.999, 1.0):
        k = math.ceil(keep * x.numel())
        want = x.abs().sort().values[k - 1].item()
        one = magnitude_thresholds([("w", x.numel(), [x])], keep)["w"]
        split = magnitude_thresholds([("w", x.numel(), [x[:17], x[17:4000], x[4000:]])], keep, chunk=999)["w"]
        assert one == split == want


def test_sparse_touches_exactly_the_selected_entries():
    m, b = _toy()
    theta0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    zo = zd.ZOConfig(lr=1e-2, eps=1e-3, sparse_keep=0.25, restore="master", compile=False)
    eng = zd.initialize(m, None, zo, loss_fn=_mse)
    for _ in range(3):
        eng.step(b)
    eng.flush()
    for n, p in m.named_parameters():
        tau = eng.state.thresholds[n]
        selected = theta0[n].abs() <= tau
        changed = p.detach() != theta0[n]
        assert torch.equal(changed, selected), n
        assert selected.sum() == max(1, math.ceil(0.25 * p.numel()))


def test_sparse_needs_an_exact_copy_of_theta():
    m, _ = _toy()
    with pytest.raises(ValueError, match="zo.restore=master"):
        zd.initialize(m, None, zd.ZOConfig(sparse_keep=0.5, restore="inplace"), loss_fn=_mse)


def test_decaying_schedule_needs_total_steps():
    m, _ = _toy()
    with pytest.raises(ValueError, match="zo.total_steps"):
        zd.initialize(m, None, zd.ZOConfig(lr_schedule="cosine"), loss_fn=_mse)


VARIANTS = {
    "sign_cosine": dict(ZO, optimizer="sign", lr=1e-4, lr_schedule="cosine", warmup_steps=1, total_steps=4),
    "momentum": dict(ZO, optimizer="momentum", momentum=0.9, momentum_window=2),
    # weight decay is dense (it is not a perturbation): off here so untouched entries stay bit-identical
    "sparse": dict(ZO, weight_decay=0.0, sparse_keep=0.3, restore="master"),
}


@pytest.mark.dist
def test_variants_two_ranks_match_one_process_and_replay(model_dirs, tmp_path, ranks):
    llama = model_dirs["llama"]
    bl = tmp_path / "bl.pt"
    batches = save_batches(bl, 1000)
    ranks(2, [scenario(name, llama, Z3, zo, bl, tmp_path) for name, zo in VARIANTS.items()], tmp_path)
    for name, zo in VARIANTS.items():
        steps, weights = reference(llama, zo, batches)
        compare(tmp_path / name, steps, weights)
        # the log alone (its recorded update streams) rebuilds the trained weights in one process
        m = replayed(llama, tmp_path / f"{name}.traj.jsonl")
        live = worker_weights(tmp_path / name)
        for k, w in m.named_parameters():
            w = w.detach()
            if zo.get("restore") == "master":  # exact copy of theta: the replay is bitwise
                assert torch.equal(live[k], w), f"{name}: {k}"
            else:
                assert rel_err(live[k], w) <= 1e-6, f"{name}: {k}"
    base = AutoModelForCausalLM.from_pretrained(llama)
    live = worker_weights(tmp_path / "sparse")
    frac = [(live[k] != w.detach()).float().mean().item() for k, w in base.named_parameters() if w.numel() > 1000]
    assert all(0.25 <= f <= 0.35 for f in frac), frac  # ~30% of each parameter moved, the rest bit-identical


def test_replay_refuses_a_log_from_another_z_stream(tmp_path):
    m, b = _toy()
    eng = zd.initialize(m, None, zd.ZOConfig(lr=1e-3, compile=False), loss_fn=_mse, trajectory=tmp_path / "t.jsonl")
    eng.step(b)
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    assert '"z_stream":"zo_deepspeed.z/1"' in lines[0]
    (tmp_path / "old.jsonl").write_text("\n".join([lines[0].replace("zo_deepspeed.z/1", "zo_deepspeed.z/0")]
                                                  + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="z stream 'zo_deepspeed.z/0'"):
        zd.replay(_toy()[0], tmp_path / "old.jsonl", zo=zd.ZOConfig(compile=False))
