"""Real multi-rank runs (DeepSpeed launcher, gloo CPU ranks) against a single process without DeepSpeed.

Every scenario trains a tiny HF causal LM for a few steps and must end with the
same losses, g and weights as the plain single-process run. World size 1 alone
would prove nothing: at W=1 p.data aliases ds_tensor, hiding the persistent-
parameter trap, and there is no padding.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import zo_deepspeed as zd
from conftest import make_batches

pytestmark = pytest.mark.dist

Z3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
Z3_T0 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
Z3_OFF = {"train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True}}}
Z0 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
Z3_BF16 = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}


def reference(model_dir, zo: dict, batches, dtype=torch.float32, shards: int | None = None, micro: int = 1):
    """Plain single-process run. With ``shards``, feed the ranks' shards as micro-batches so that
    forward shapes (and so low-precision rounding) match the distributed run exactly."""
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    eng = zd.initialize(m, None, zd.ZOConfig(**zo))
    out = []
    for b in batches:
        n = b["input_ids"].shape[0]
        if shards:
            parts = []
            for idx in torch.tensor_split(torch.arange(n), shards):
                parts += [{k: v[idx[i]] for k, v in b.items()} for i in torch.tensor_split(torch.arange(len(idx)), micro)]
            r = eng.step(parts)
        else:
            r = eng.step(b)
        out.append(r)
    eng.flush()
    return out, {k: v.detach().float() for k, v in m.named_parameters()}


def compare(out_prefix, ref_steps, ref_weights, loss_rtol=1e-6, w_rtol=1e-6):
    got = json.load(open(f"{out_prefix}.json"))
    for r, d in zip(ref_steps, got["steps"], strict=True):
        assert d["loss_plus"] == pytest.approx(r.loss_plus, rel=loss_rtol)
        assert d["loss_minus"] == pytest.approx(r.loss_minus, rel=loss_rtol)
        assert d["g"] == pytest.approx(list(r.g), rel=1e-3, abs=1e-6)
    sd = load_file(f"{out_prefix}.safetensors")
    assert set(sd) == set(ref_weights)
    for k, w in ref_weights.items():
        rel = ((sd[k] - w).norm() / w.norm().clamp_min(1e-12)).item()
        assert rel <= w_rtol, f"{k}: relative weight difference {rel:.3g}"
    return got


def scenario(name, model_dir, ds, zo, batches_file, tmp_path, **kw):
    return dict(name=name, model_dir=str(model_dir), ds_config=ds, zo=zo, batches=str(batches_file),
                out=str(tmp_path / name), **kw)


ZO = {"lr": 1e-4, "eps": 1e-3, "weight_decay": 0.1}


def test_two_ranks_all_layouts(model_dirs, tmp_path, ranks):
    """W=2: ZeRO-3 with the default persistence threshold (OPT and Llama), CPU offload, stage 0,
    n-SPSA with gradient accumulation, bf16 partitions with master and backup restore."""
    opt, llama = model_dirs["opt"], model_dirs["llama"]
    bo, bl = tmp_path / "bo.pt", tmp_path / "bl.pt"
    batches_o, batches_l = make_batches(128), make_batches(1000)
    torch.save(batches_o, bo)
    torch.save(batches_l, bl)
    scs = [
        scenario("opt_z3", opt, Z3, ZO, bo, tmp_path),
        scenario("llama_z3", llama, Z3, ZO, bl, tmp_path),
        scenario("llama_z3_offload", llama, Z3_OFF, ZO, bl, tmp_path),
        scenario("llama_z0", llama, Z0, ZO, bl, tmp_path),
        scenario("llama_z3_q2_gas", llama, Z3_T0, dict(ZO, q=2, fuse_update=False), bl, tmp_path, micro=2),
        scenario("llama_bf16_master", llama, Z3_BF16, dict(ZO, restore="master"), bl, tmp_path, dtype="bfloat16"),
        scenario("llama_bf16_backup", llama, Z3_BF16, dict(ZO, restore="backup"), bl, tmp_path, dtype="bfloat16"),
    ]
    ranks(2, scs, tmp_path)

    got = compare(tmp_path / "opt_z3", *reference(opt, ZO, batches_o))
    assert got["kind"] == "zero3" and got["world"] == 2
    compare(tmp_path / "llama_z3", *reference(llama, ZO, batches_l))
    compare(tmp_path / "llama_z3_offload", *reference(llama, ZO, batches_l))
    assert compare(tmp_path / "llama_z0", *reference(llama, ZO, batches_l))["kind"] == "replica"
    compare(tmp_path / "llama_z3_q2_gas", *reference(llama, dict(ZO, q=2, fuse_update=False), batches_l))
    for mode in ("master", "backup"):
        # bf16 forwards are not bitwise reproducible across layouts (the CPU
        # GEMM's blocking depends on buffer alignment), and g amplifies that
        # noise by 1/(2 eps); so check losses loosely, and the partition
        # machinery exactly: replaying the live run's own log (its seeds and g)
        # in one process must reproduce its bf16 weights bit for bit.
        zo = dict(ZO, restore=mode)
        steps, _ = reference(llama, zo, batches_l, dtype=torch.bfloat16, shards=2)
        got = json.load(open(tmp_path / f"llama_bf16_{mode}.json"))
        assert got["base_bytes"] > 0
        for r, d in zip(steps, got["steps"], strict=True):
            assert d["loss_plus"] == pytest.approx(r.loss_plus, rel=1e-4)
        m = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
        zd.replay(m, tmp_path / f"llama_bf16_{mode}.traj.jsonl").flush()
        live = load_file(tmp_path / f"llama_bf16_{mode}.safetensors")
        for k, w in m.named_parameters():
            assert torch.equal(live[k], w.detach().float()), f"{mode}: {k} differs from the replay"

    # the live run's trajectory log replayed on the base weights, in one process
    m = AutoModelForCausalLM.from_pretrained(llama)
    zd.replay(m, tmp_path / "llama_z3.traj.jsonl").flush()
    live = load_file(tmp_path / "llama_z3.safetensors")
    for k, w in m.named_parameters():
        assert ((live[k] - w.detach()).norm() / w.detach().norm()).item() <= 1e-6


def test_three_ranks_padding(model_dirs, tmp_path, ranks):
    """W=3: partitions that do not divide evenly carry tail padding, which must never be touched."""
    llama = model_dirs["llama"]
    bl = tmp_path / "bl.pt"
    batches = make_batches(1000)
    torch.save(batches, bl)
    ranks(3, [scenario("llama_z3_w3", llama, Z3, ZO, bl, tmp_path)], tmp_path)
    compare(tmp_path / "llama_z3_w3", *reference(llama, ZO, batches))


def test_four_ranks_hpz(model_dirs, tmp_path, ranks):
    """W=4 with ZeRO++ hpZ groups of 2: forwards read ds_secondary_tensor, which must see every edit."""
    llama = model_dirs["llama"]
    bl = tmp_path / "bl.pt"
    batches = make_batches(1000, batch=8)
    torch.save(batches, bl)
    hpz = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}
    ranks(4, [scenario("llama_hpz", llama, hpz, ZO, bl, tmp_path)], tmp_path)
    got = compare(tmp_path / "llama_hpz", *reference(llama, ZO, batches))
    assert got["kind"] == "zero3-hpz"


def test_two_ranks_nvme_offload(tmp_path, ranks):
    """ZeRO-Infinity: partitions above the swap threshold live on disk as 0-dim placeholders and
    are swapped in, edited and swapped out in batches; smaller ones stay in host memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8000, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    batches = make_batches(8000, n_steps=3)
    torch.save(batches, tmp_path / "b.pt")
    ds = {"train_micro_batch_size_per_gpu": 1,
          "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path / "swap"),
                                                              "pin_memory": False, "buffer_count": 4,
                                                              "buffer_size": 5_000_000}},
          "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True,
                  "thread_count": 1}}
    ranks(2, [scenario("nvme", tmp_path / "llama", ds, ZO, tmp_path / "b.pt", tmp_path)], tmp_path)
    got = compare(tmp_path / "nvme", *reference(tmp_path / "llama", ZO, batches))
    assert got["kind"] == "zero3-nvme" and got["nvme_swapped"] >= 1
