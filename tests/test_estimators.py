"""Estimators on the K-block forward (zo.estimator) and perturbation parallelism (zo.perturb_parallel).

* FZOO's step equals its rule written out by hand: theta <- theta - lr sum_i (L_i - L_0)/(N sigma) u_i,
  sigma the population standard deviation of L_1..L_N, in partition mode (any module) and read mode;
* read mode (one stacked forward) and partition mode (the blocks one after the other) give the same
  losses and weights, bit for bit in one process, for both estimators;
* replay of a log rebuilds each estimator's weights;
* perturbation parallelism (ranks of a data group evaluate different seeds of the step) equals one
  process evaluating all the seeds on the whole batch, at 2 and 4 real ranks, ZeRO-3 and stage 0.
"""
from __future__ import annotations

import math

import pytest
import torch

import zo_deepspeed as zd
from harness import (FORWARD, Z0, Z3, ZO, compare, make_batches, reference, save_batches, scenario, tiny_llama,
                     worker_result)
from zo_deepspeed.estimators import projected_gradients
from zo_deepspeed.rng import stream_key, variates


class Quadratic(torch.nn.Module):
    """f = 0.5 theta^T A theta - b^T theta (fp64 values through fp32 parameters)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, 4, generator=g))
        self.v = torch.nn.Parameter(torch.randn(5, generator=g))
        q = torch.randn(17, 17, generator=g, dtype=torch.float64)
        self.register_buffer("A", q @ q.T / 17 + torch.eye(17, dtype=torch.float64))
        self.register_buffer("b", torch.randn(17, generator=g, dtype=torch.float64))

    def theta(self):
        return torch.cat([self.w.double().flatten(), self.v.double()])

    def forward(self):
        t = self.theta()
        return 0.5 * t @ self.A @ t - self.b @ t


def quad_loss(forward, batch):
    return forward(), torch.tensor(1.0, dtype=torch.float64)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_fzoo_step_is_the_stated_rule_by_hand(distribution):
    m = Quadratic()
    lr, eps, n = 0.05, 1e-3, 4
    theta0 = {k: v.detach().double().clone() for k, v in m.named_parameters()}
    eng = zd.initialize(m, None, zd.ZOConfig(lr=lr, eps=eps, q=n, estimator="fzoo", distribution=distribution,
                                             restore="master", compile=False), loss_fn=quad_loss)
    r = eng.step({})
    eng.flush()
    u = [{k: variates(stream_key(s, k), 0, p.numel(), distribution).double().view_as(p) for k, p in theta0.items()}
         for s in r.seeds]

    def f(th):
        t = torch.cat([th["w"].flatten(), th["v"]])
        return float(0.5 * t @ m.A @ t - m.b @ t)

    # the perturbed models are what the kernel makes of theta + eps u in float32
    l0 = f(theta0)
    li = [f({k: (theta0[k].float() + eps * ui[k].float()).double() for k in theta0}) for ui in u]
    assert r.losses[0] == pytest.approx(l0, rel=1e-12) and list(r.losses[1:]) == pytest.approx(li, rel=1e-6)
    mean = sum(li) / n
    sigma = math.sqrt(sum((x - mean) ** 2 for x in li) / n)  # population standard deviation
    g = [(x - l0) / sigma for x in li]
    assert list(r.g) == pytest.approx(g, rel=1e-4)
    assert list(r.g) == projected_gradients("fzoo", r.losses, eps)  # the engine used its own estimator
    want = {k: theta0[k] - lr * sum(gi * ui[k] for gi, ui in zip(r.g, u)) / n for k in theta0}
    for k, p in m.named_parameters():
        assert torch.allclose(p.detach().double(), want[k], rtol=0, atol=1e-6), k
    assert r.loss == r.losses[0]  # fzoo reports the clean loss


def test_fzoo_needs_several_perturbations_and_a_spread():
    with pytest.raises(ValueError, match="zo.estimator=fzoo .* set zo.q >= 2"):
        zd.ZOConfig(estimator="fzoo", q=1)
    assert projected_gradients("fzoo", [1.0, 2.0, 2.0, 2.0], 1e-3) == [0.0, 0.0, 0.0]  # sigma = 0: no step
    assert all(math.isnan(x) for x in projected_gradients("fzoo", [math.nan, 1.0, 2.0], 1e-3))


@pytest.mark.parametrize("zo", [{"estimator": "fzoo", "q": 3, "distribution": "rademacher"},
                                {"estimator": "spsa", "q": 3}])
def test_one_stacked_forward_equals_the_blocks_one_after_the_other(zo, tmp_path):
    """Read mode (K = q + 1 or 2q blocks in one forward) against partition mode with exact restore (the
    blocks shown one at a time): the same losses, g and weights to the bit; the read run's log replays."""
    batches = make_batches(1000, n_steps=3)
    runs = {}
    for mode in ("partition", "forward"):
        m = tiny_llama()
        eng = zd.initialize(m, None, zd.ZOConfig(**{**ZO, "perturb": mode, "restore": "master", **zo}),
                            trajectory=tmp_path / f"{mode}.jsonl")
        steps = [eng.step(b) for b in batches]
        eng.flush()
        runs[mode] = steps, {k: v.detach().clone() for k, v in m.named_parameters()}
    (ps, pw), (fs, fw) = runs["partition"], runs["forward"]
    assert [s.losses for s in fs] == [s.losses for s in ps] and len(fs[0].losses) == (4 if zo["q"] == 3 and
                                                                                        zo["estimator"] == "fzoo"
                                                                                        else 6)
    assert [s.update for s in fs] == [s.update for s in ps]
    assert all(torch.equal(fw[k], pw[k]) for k in pw)
    rep = zd.replay(tiny_llama(), tmp_path / "forward.jsonl")
    rep.flush()
    assert all(torch.equal(p, fw[k]) for k, p in rep.module.named_parameters())


def test_perturbation_parallel_settings_are_checked():
    with pytest.raises(ValueError, match="must divide zo.q=3"):
        zd.ZOConfig(q=3, perturb_parallel=2)
    with pytest.raises(ValueError, match="set zo.perturb=forward"):
        zd.ZOConfig(q=2, perturb_parallel=2, perturb="partition")
    with pytest.raises(ValueError, match="does not divide the world size 1"):
        zd.initialize(tiny_llama(), None, zd.ZOConfig(q=2, perturb_parallel=2))


@pytest.mark.dist
def test_perturbation_parallel_at_two_and_four_ranks_equals_one_process(model_dirs, tmp_path, ranks):
    """W=2, P=2: one data group, each rank evaluates half the seeds on the whole batch; W=4, P=2: two data
    groups of two. ZeRO-3 (the ranks gather theta, unperturbed, and read their own perturbations) and stage
    0. Every rank applies every seed's update. Reference: one process, all seeds, the whole batch."""
    llama = model_dirs["llama"]
    batches = save_batches(tmp_path / "b.pt", 1000, batch=8)
    cases = {"spsa": {**FORWARD, "q": 4, "perturb_parallel": 2},
             "fzoo": {**FORWARD, "q": 4, "perturb_parallel": 2, "estimator": "fzoo", "distribution": "rademacher"}}
    ranks(2, [scenario(f"w2_{n}_{ds}", llama, cfg, zo, tmp_path / "b.pt", tmp_path)
              for n, zo in cases.items() for ds, cfg in (("z3", Z3), ("z0", Z0))], tmp_path)
    ranks(4, [scenario(f"w4_spsa_{ds}", llama, cfg, cases["spsa"], tmp_path / "b.pt", tmp_path)
              for ds, cfg in (("z3", Z3), ("z0", Z0))], tmp_path)
    for n, zo in cases.items():
        ref = reference(llama, {**zo, "perturb_parallel": 1}, batches)
        for ds in ("z3", "z0"):
            got = compare(tmp_path / f"w2_{n}_{ds}", *ref)
            assert got["world"] == 2
    ref = reference(llama, {**cases["spsa"], "perturb_parallel": 1}, batches)
    for ds, kind in (("z3", "zero3"), ("z0", "replica")):
        got = compare(tmp_path / f"w4_spsa_{ds}", *ref)
        assert got["world"] == 4 and worker_result(tmp_path / f"w4_spsa_{ds}")["kind"] == kind
