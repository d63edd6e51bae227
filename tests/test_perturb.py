"""Perturb on read (zo.perturb=forward) against partition mode, the reference.

Forward mode evaluates the K = 2q perturbed models of a step in one forward over a stacked batch, each
module reading theta + c_k z_k from its gathered copy; partition mode edits every rank's partition in
place. With the exact restore of partition mode (zo.restore=master) the arithmetic is the same element
for element (fused.apply with base theta, and the -c z model as the reflection of the +c z one), so in one
process the two give the same losses, g and weights to the bit; across ranks the forwards themselves are
sharded differently, so multi-rank runs are compared at 1e-6 like every other layout test.
"""
from __future__ import annotations

import json

import pytest
import torch

import zo_deepspeed as zd
from harness import (FORWARD, Z0, Z3, Z3_BF16, Z3_OFF, Z3_T0, ZO, compare, compare_steps, make_batches, reference,
                     reference_engine, rel_err, replayed, save_batches, scenario, tiny_llama, tiny_opt, worker_result,
                     worker_weights, z3_nvme)
from zo_deepspeed.perturb import _linear_into

MASTER = {**ZO, "restore": "master"}  # partition mode with exact restore: the same arithmetic as forward mode


def _run(model, zo: dict, batches, dtype=torch.float32):
    eng = zd.initialize(model, None, zd.ZOConfig(**zo))
    steps = [eng.step(b) for b in batches]
    eng.flush()
    return steps, {k: v.detach().clone() for k, v in eng.module.named_parameters()}, eng


@pytest.mark.parametrize("build,vocab", [(tiny_llama, 1000), (tiny_opt, 128)])
@pytest.mark.parametrize("variant", [{}, {"q": 2, "optimizer": "momentum", "momentum_window": 3, "compile": False},
                                     {"optimizer": "sign", "sparse_keep": 0.3, "compile": False},
                                     {"lr_schedule": "cosine", "total_steps": 3, "distribution": "rademacher",
                                      "compile": False}])
def test_forward_equals_partition_master_bit_for_bit_in_one_process(build, vocab, variant):
    """Tied embeddings (Llama: the lookup perturbs only its rows, the head reads the whole weight), OPT's
    learned positions (an Embedding subclass: the generic path), every update rule, Sparse-MeZO, q = 2,
    both z distributions, the compiled and the eager kernel."""
    batches = make_batches(vocab, n_steps=3)
    ref, ref_w, _ = _run(build(), {**MASTER, **variant}, batches)
    got, got_w, eng = _run(build(), {**FORWARD, **variant}, batches)
    assert eng.perturb == "forward" and eng.state.restore == "none" and eng.read.modules
    for r, s in zip(ref, got, strict=True):
        assert (s.loss_plus, s.loss_minus, s.g, s.update) == (r.loss_plus, r.loss_minus, r.g, r.update)
    assert all(torch.equal(got_w[k], ref_w[k]) for k in ref_w)
    assert any(not torch.equal(got_w[k], w) for k, w in build().named_parameters())  # the run moved


def test_forward_against_partition_inplace_and_its_own_replay(tmp_path):
    """In-place restore rounds the +-eps round trip (its L- sees theta + eps z - 2 eps z): close, not equal.
    The forward run's own log replays to its weights exactly (the update is the same kernel)."""
    batches = make_batches(1000, n_steps=4)
    ref, ref_w, _ = _run(tiny_llama(), ZO, batches)
    eng = zd.initialize(tiny_llama(), None, zd.ZOConfig(**FORWARD), trajectory=tmp_path / "log.jsonl")
    got = [eng.step(b) for b in batches]
    eng.flush()
    for r, s in zip(ref, got, strict=True):
        assert s.loss_plus == pytest.approx(r.loss_plus, rel=1e-6) and s.loss_minus == pytest.approx(r.loss_minus,
                                                                                                       rel=1e-6)
    w = dict(eng.module.named_parameters())
    assert max(((w[k] - ref_w[k]).norm() / ref_w[k].norm()).item() for k in ref_w) < 1e-5
    replay = zd.replay(tiny_llama(), tmp_path / "log.jsonl")
    replay.flush()
    assert all(torch.equal(p, w[k]) for k, p in replay.module.named_parameters())


def test_bf16_lr0_leaves_every_weight_bit_identical_and_updates_round_stochastically(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    eng = zd.initialize(model, None, zd.ZOConfig(**{**FORWARD, "lr": 0.0, "weight_decay": 0.0}))
    assert eng.state.restore == "none" and eng.state.base_bytes() == 0  # no copy of theta
    for b in make_batches(1000, n_steps=20, batch=2, seq=8):
        eng.step(b)
    eng.flush()
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    # lr > 0: the updates land in bf16 stochastically rounded, and the log replays them bit for bit
    eng = zd.initialize(tiny_llama().to(torch.bfloat16), None, zd.ZOConfig(**FORWARD),
                        trajectory=tmp_path / "bf16.jsonl")
    for b in make_batches(1000, n_steps=3):
        eng.step(b)
    eng.flush()
    replay = zd.replay(tiny_llama().to(torch.bfloat16), tmp_path / "bf16.jsonl")
    replay.flush()
    live = dict(eng.module.named_parameters())
    assert all(torch.equal(p, live[k]) for k, p in replay.module.named_parameters())
    assert any(not torch.equal(p, before[k]) for k, p in live.items())


def test_module_calls_hooks_and_memory_of_one_step():
    """Each wrapped module runs once per call of the stacked forward (its forward hooks fire once: DeepSpeed's
    gather/release hooks are forward hooks); evaluation outside a step reads theta; the one reused scratch
    buffer holds the largest module's own parameters, nothing per block."""
    m = tiny_llama()
    eng = zd.initialize(m, None, zd.ZOConfig(**{**FORWARD, "q": 2}))
    calls: dict[str, int] = {}
    for name, mod in m.named_modules():
        mod.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    b = make_batches(1000, n_steps=1)[0]
    eng.step(b)
    assert set(eng.read.modules) <= set(calls) and all(calls[n] == 1 for n in eng.read.modules)
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for _, mod in m.named_modules())
    assert sum(t.numel() for t in eng.read._buffers.values()) == largest
    eng.flush()
    theta = {k: v.detach().clone() for k, v in m.named_parameters()}
    with torch.no_grad():  # outside a step the wrappers pass through: the plain model's logits
        got = eng.forward(input_ids=b["input_ids"], use_cache=False).logits
        plain = tiny_llama()
        for k, p in plain.named_parameters():
            p.copy_(theta[k])
        assert torch.equal(got, plain(input_ids=b["input_ids"], use_cache=False).logits)


def test_linear_written_in_place_is_f_linear_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for shape in ((6, 16, 32), (7, 32)):
        x, w, bias = torch.randn(*shape, generator=g), torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
        for b in (bias, None):
            out = torch.empty(*shape[:-1], 24)
            _linear_into(out, x, w, b)
            assert torch.equal(out, torch.nn.functional.linear(x, w, b))


def test_refusals_name_the_fix():
    class Odd(torch.nn.Module):  # owns a parameter and has a child that owns one: no row blocks
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(4))
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x) * self.scale

    loss = lambda fwd, b: (fwd(b["x"]).sum().double(), torch.tensor(1.0))  # noqa: E731
    with pytest.raises(ValueError, match="module Odd owns trainable parameters and has children.*zo.perturb=partition"):
        zd.initialize(Odd(), None, zd.ZOConfig(perturb="forward"), loss_fn=loss)
    assert zd.initialize(Odd(), None, zd.ZOConfig(), loss_fn=loss).perturb == "partition"  # auto: not an LM
    with pytest.raises(ValueError, match="zo.perturb=forward never perturbs it; use zo.restore=none"):
        zd.ZOConfig(perturb="forward", restore="inplace")
    with pytest.raises(ValueError, match="zo.restore=none .* only zo.perturb=forward"):
        zd.ZOConfig(perturb="partition", restore="none")
    from zo_deepspeed.run_config import load_run_config, resolve_run_config

    with pytest.raises(ValueError, match="set zo.perturb=partition"):
        resolve_run_config(load_run_config(None, ["data.task=squad", "train.objective=f1", "zo.perturb=forward"]))
    cfg = resolve_run_config(load_run_config(None, ["data.task=squad", "train.objective=f1"]))
    assert cfg.zo.perturb == "partition"
    assert resolve_run_config(load_run_config(None, [])).zo.perturb == "forward"


# -- real ranks -----------------------------------------------------------------------------------------

@pytest.mark.dist
def test_two_ranks_every_layout_equals_partition_mode(model_dirs, tmp_path, ranks):
    """W=2: ZeRO-3 with persistent parameters, CPU offload, stage 0, q=2 with micro-batches, Sparse-MeZO,
    momentum, sign; and partition mode itself in the same launch, to measure what each gathers and edits."""
    llama, opt = model_dirs["llama"], model_dirs["opt"]
    batches = save_batches(tmp_path / "bl.pt", 1000)
    batches_o = save_batches(tmp_path / "bo.pt", 128)
    cases = {
        "z3": (Z3, {}), "z3_offload": (Z3_OFF, {}), "z0": (Z0, {}),
        "z3_q2_gas": (Z3_T0, {"q": 2}), "z3_sparse": (Z3_T0, {"sparse_keep": 0.3}),
        "z3_momentum": (Z3, {"optimizer": "momentum", "momentum_window": 3}), "z3_sign": (Z3_T0, {"optimizer": "sign"}),
    }
    scs = [scenario(f"fwd_{n}", llama, ds, {**FORWARD, **v}, tmp_path / "bl.pt", tmp_path,
                    micro=2 if "gas" in n else 1) for n, (ds, v) in cases.items()]
    logged = {**Z3_T0, "comms_logger": {"enabled": True, "verbose": False, "prof_all": True}}  # gathered bytes
    scs += [scenario("fwd_opt_z3", opt, Z3_T0, FORWARD, tmp_path / "bo.pt", tmp_path),
            scenario("part_z3", llama, logged, MASTER, tmp_path / "bl.pt", tmp_path),
            scenario("fwd_z3_t0", llama, logged, FORWARD, tmp_path / "bl.pt", tmp_path),
            scenario("part_offload", llama, Z3_OFF, MASTER, tmp_path / "bl.pt", tmp_path)]
    ranks(2, scs, tmp_path)
    for n, (ds, v) in cases.items():
        got = compare(tmp_path / f"fwd_{n}", *reference(llama, {**MASTER, **v}, batches))
        assert got["perturb"] == "forward" and got["restore"] == "none", n
    compare(tmp_path / "fwd_opt_z3", *reference(opt, MASTER, batches_o))
    # one gather per step: forward mode's all-gathers are half of partition mode's two forwards (a little
    # more: partition mode's second forward finds the tied embedding still gathered from the first's head)
    fwd, part = worker_result(tmp_path / "fwd_z3_t0"), worker_result(tmp_path / "part_z3")
    for f, p in zip(fwd["steps"], part["steps"]):
        assert 0.45 * p["gathered_bytes"] <= f["gathered_bytes"] <= 0.55 * p["gathered_bytes"], (f, p)
    # the partition receives the update only: one pass over the local elements per step (partition: 2-3)
    off, poff = worker_result(tmp_path / "fwd_z3_offload"), worker_result(tmp_path / "part_offload")
    assert all(s["edited"] == off["local_numel"] for s in off["steps"])
    assert all(s["edited"] >= 2 * poff["local_numel"] for s in poff["steps"])


@pytest.mark.dist
def test_three_ranks_and_bf16(model_dirs, tmp_path, ranks):
    """W=3 (padding), and at W=2 bf16 partitions updated in place with stochastic rounding: the log of the
    2-rank run replays to its weights bit for bit in one process."""
    llama = model_dirs["llama"]
    batches = save_batches(tmp_path / "bl.pt", 1000)
    ranks(3, [scenario("w3", llama, Z3, FORWARD, tmp_path / "bl.pt", tmp_path)], tmp_path)
    compare(tmp_path / "w3", *reference(llama, MASTER, batches))
    ranks(2, [scenario("bf16", llama, Z3_BF16, FORWARD, tmp_path / "bl.pt", tmp_path, dtype="bfloat16")], tmp_path)
    got = worker_result(tmp_path / "bf16")
    assert got["restore"] == "none" and got["base_bytes"] == 0
    ref_steps, _ = reference(llama, FORWARD, batches, dtype=torch.bfloat16, shards=2)
    compare_steps(got["steps"], ref_steps, rel=1e-2, minus=False, g=False)  # bf16 forwards differ by layout
    live = worker_weights(tmp_path / "bf16")
    for k, w in replayed(llama, tmp_path / "bf16.traj.jsonl", dtype=torch.bfloat16).named_parameters():
        assert torch.equal(live[k], w.detach().float()), k


@pytest.mark.dist
def test_four_ranks_hpz_and_nvme(tmp_path, ranks):
    """ZeRO++ hpZ (forwards gather from the secondary partition, which receives the same update) and NVMe
    offload (the update swaps partitions in and out)."""
    llama = tmp_path / "llama"
    tiny_llama(save_to=llama)
    batches = save_batches(tmp_path / "b.pt", 1000, batch=8)
    hpz = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}
    ranks(4, [scenario("hpz", llama, hpz, FORWARD, tmp_path / "b.pt", tmp_path)], tmp_path)
    assert compare(tmp_path / "hpz", *reference(llama, MASTER, batches))["kind"] == "zero3-hpz"
    big = tmp_path / "big"
    tiny_llama(save_to=big, vocab_size=8000, hidden_size=128, intermediate_size=512)
    nb = save_batches(tmp_path / "nb.pt", 8000, n_steps=3)
    nvme = z3_nvme(tmp_path / "swap")
    ranks(2, [scenario("nvme", big, nvme, FORWARD, tmp_path / "nb.pt", tmp_path)], tmp_path)
    got = compare(tmp_path / "nvme", *reference(big, MASTER, nb))
    assert got["kind"] == "zero3-nvme" and got["nvme_swapped"] >= 1
    assert json.loads((tmp_path / "nvme.json").read_text())["perturb"] == "forward"


@pytest.mark.dist
def test_two_ranks_lora_and_prefix(model_dirs, tmp_path, ranks):
    """The adapters' parameters are what the wrappers perturb (LoRA's A/B Linears, the prefix encoder's
    Embedding, whose batch of virtual tokens is stacked with the input's): forward mode at 2 ZeRO-3 ranks
    equals partition mode in one process."""
    from zo_deepspeed.adapters import AdapterConfig

    llama, opt = model_dirs["llama"], model_dirs["opt"]
    bl, bo = save_batches(tmp_path / "bl.pt", 1000, n_steps=3), save_batches(tmp_path / "bo.pt", 128, n_steps=3)
    cases = {"lora": (llama, {"mode": "lora", "init_seed": 3}, tmp_path / "bl.pt", bl),
             "prefix": (opt, {"mode": "prefix", "init_seed": 5}, tmp_path / "bo.pt", bo)}

    def zo(mode, perturb):
        d = AdapterConfig(mode=mode).zo_defaults()
        return {**d, "lr": d["lr"] * 10, "weight_decay": 0.1, "seed": 7, "perturb": perturb}

    ranks(2, [scenario(n, m, Z3, zo(a["mode"], "forward"), f, tmp_path, adapter=a) for n, (m, a, f, _) in cases.items()],
          tmp_path, worker="run_adapters.py")
    for n, (m, a, _, batches) in cases.items():
        ref_steps, ref = reference_engine(m, zo(a["mode"], "partition"), batches, shards=2, adapter=a)
        compare_steps(worker_result(tmp_path / n)["steps"], ref_steps, rel=1e-6, what=n)
        live = worker_weights(tmp_path / n)
        for k, w in ref.module.named_parameters():
            # an adapter starting at 0 is nothing but sum(lr g z), g amplifying the forwards' 1e-8: as test_adapters
            assert rel_err(live[k], w.detach(), floor=1e-12) <= 1e-4, f"{n}: {k}"
