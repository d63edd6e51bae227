"""Real multi-rank runs (DeepSpeed launcher, gloo CPU ranks) against a single process without DeepSpeed.

Every scenario trains a tiny HF causal LM for a few steps and must end with the
same losses, g and weights as the plain single-process run. World size 1 alone
would prove nothing: at W=1 p.data aliases ds_tensor, hiding the persistent-
parameter trap, and there is no padding.
"""
from __future__ import annotations

import pytest
import torch

from harness import (Z0, Z3, Z3_BF16, Z3_OFF, Z3_T0, ZO, compare, compare_steps, reference, rel_err, replayed,
                     save_batches, scenario, tiny_llama, worker_result, worker_weights, z3, z3_nvme)

pytestmark = pytest.mark.dist


def test_two_ranks_all_layouts(model_dirs, tmp_path, ranks):
    """W=2: ZeRO-3 with the default persistence threshold (OPT and Llama), CPU offload, stage 0,
    n-SPSA with gradient accumulation, bf16 partitions with master and backup restore."""
    opt, llama = model_dirs["opt"], model_dirs["llama"]
    bo, bl = tmp_path / "bo.pt", tmp_path / "bl.pt"
    batches_o, batches_l = save_batches(bo, 128), save_batches(bl, 1000)
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
        got = worker_result(tmp_path / f"llama_bf16_{mode}")
        assert got["base_bytes"] > 0
        compare_steps(got["steps"], steps, rel=1e-4, minus=False, g=False)
        m = replayed(llama, tmp_path / f"llama_bf16_{mode}.traj.jsonl", dtype=torch.bfloat16)
        live = worker_weights(tmp_path / f"llama_bf16_{mode}")
        for k, w in m.named_parameters():
            assert torch.equal(live[k], w.detach().float()), f"{mode}: {k} differs from the replay"

    # the live run's trajectory log replayed on the base weights, in one process
    m = replayed(llama, tmp_path / "llama_z3.traj.jsonl")
    live = worker_weights(tmp_path / "llama_z3")
    for k, w in m.named_parameters():
        assert rel_err(live[k], w.detach()) <= 1e-6


def test_three_ranks_padding(model_dirs, tmp_path, ranks):
    """W=3: partitions that do not divide evenly carry tail padding, which must never be touched."""
    llama = model_dirs["llama"]
    bl = tmp_path / "bl.pt"
    batches = save_batches(bl, 1000)
    ranks(3, [scenario("llama_z3_w3", llama, Z3, ZO, bl, tmp_path)], tmp_path)
    compare(tmp_path / "llama_z3_w3", *reference(llama, ZO, batches))


def test_four_ranks_hpz(model_dirs, tmp_path, ranks):
    """W=4 with ZeRO++ hpZ groups of 2: forwards read ds_secondary_tensor, which must see every edit."""
    llama = model_dirs["llama"]
    bl = tmp_path / "bl.pt"
    batches = save_batches(bl, 1000, batch=8)
    hpz = z3(zero_hpz_partition_size=2)
    ranks(4, [scenario("llama_hpz", llama, hpz, ZO, bl, tmp_path)], tmp_path)
    got = compare(tmp_path / "llama_hpz", *reference(llama, ZO, batches))
    assert got["kind"] == "zero3-hpz"


def test_two_ranks_nvme_offload(tmp_path, ranks):
    """ZeRO-Infinity: partitions above the swap threshold live on disk as 0-dim placeholders and
    are swapped in, edited and swapped out in batches; smaller ones stay in host memory."""
    tiny_llama(save_to=tmp_path / "llama", vocab_size=8000, hidden_size=128, intermediate_size=512)
    batches = save_batches(tmp_path / "b.pt", 8000, n_steps=3)
    ds = z3_nvme(tmp_path / "swap")
    ranks(2, [scenario("nvme", tmp_path / "llama", ds, ZO, tmp_path / "b.pt", tmp_path)], tmp_path)
    got = compare(tmp_path / "nvme", *reference(tmp_path / "llama", ZO, batches))
    assert got["kind"] == "zero3-nvme" and got["nvme_swapped"] >= 1
