"""The shipped DeepSpeed configs (ds_configs/) and their validation (zo_deepspeed/ds_config.py).

* Every bad setting a user can write gets one line naming the key and the fix.
* The key lists the validator checks names against are DeepSpeed's own (checked
  against the installed DeepSpeed, so a version bump that adds keys shows up here).
* Every shipped file validates, and runs ZO steps on 2 real DeepSpeed ranks with
  the same result as one process (bf16 included; fp16 where DeepSpeed's CPU
  accelerator supports it, i.e. the CPU has fp16 arithmetic, and otherwise
  refused in one line before any model loads). zero3_hpz.json runs across 2 nodes x 2 ranks in
  tests/test_slurm.py; zero3_hpz_bf16.json runs here with one hpZ group of the
  node's 2 ranks (DeepSpeed builds hpZ groups once per process, so one hpZ
  config per launch).
"""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from harness import (DIST, REPO, ZO_EAGER, compare, compare_steps, deepspeed_cmd, filled_ds, free_port, reference,
                     repo_env, save_batches, scenario, shipped_ds, tail, tiny_llama, worker_result, write_spec, z3)
from zo_deepspeed.ds_config import (OFFLOAD_PARAM_KEYS, REMOVED_TOP_LEVEL_KEYS, TOP_LEVEL_KEYS, ZERO_KEYS,
                                    fill_auto, fill_placeholders, load_ds_config, validate_ds_config)

SHIPPED = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
# run here on 2 CPU ranks / run in tests/test_slurm.py (2 nodes x 2 ranks)
RUN_HERE = [n for n in SHIPPED if "hpz" not in n] + ["zero3_hpz_bf16"]  # hpZ last: its groups outlive it
RUN_IN_SLURM_TEST = ["zero3_hpz"]


# -- the shipped files ---------------------------------------------------------------------------

def test_shipped_set_is_complete_and_accounted_for():
    must = {"zero0", "zero3", "zero3_offload_cpu", "zero3_nvme", "zero3_hpz", "zero3_bf16", "zero3_fp16"}
    assert must <= set(SHIPPED)
    assert sorted(RUN_HERE + RUN_IN_SLURM_TEST) == SHIPPED
    readme = (REPO / "ds_configs" / "README.md").read_text()
    for n in SHIPPED:
        assert f"{n}.json" in readme, f"ds_configs/README.md does not describe {n}.json"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_is_valid(name):
    raw = shipped_ds(name)
    assert "optimizer" not in raw and "scheduler" not in raw
    zero = raw["zero_optimization"]
    if zero["stage"] == 3:
        assert "stage3_param_persistence_threshold" in zero, "persistence threshold must be explicit"
    for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert raw[k] == "auto", f"{k} should be filled from the trainer's config"
    validate_ds_config(raw, world_size=16, gpus_per_node=8)  # before filling
    for world, gpn in ((2, 2), (16, 8)):
        cfg = filled_ds(name, world, gpn)
        validate_ds_config(cfg, world_size=world, gpus_per_node=gpn)
        assert cfg["train_batch_size"] == world
        assert "auto" not in json.dumps(cfg)
    if "hpz" in name:
        assert filled_ds(name, 16, 8)["zero_optimization"]["zero_hpz_partition_size"] == 8
    if "nvme" in name:
        assert filled_ds(name)["zero_optimization"]["offload_param"]["nvme_path"] == "/nvme/zo"
    assert raw.get("bf16", {}).get("enabled", False) == ("bf16" in name)
    assert raw.get("fp16", {}).get("enabled", False) == ("fp16" in name)


def test_fill_auto_environment_fallbacks(monkeypatch):
    monkeypatch.setenv("LOCAL_SIZE", "4")
    monkeypatch.setenv("ZO_NVME_PATH", "/local_nvme")
    cfg = fill_auto(shipped_ds("zero3_hpz"), 2, 3, 8)
    assert cfg["zero_optimization"]["zero_hpz_partition_size"] == 4
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == \
        (2, 3, 48)
    assert fill_auto(shipped_ds("zero3_nvme"), 1, 1, 2)["zero_optimization"]["offload_param"]["nvme_path"] == \
        "/local_nvme"
    # without trainer settings (batch keys stay "auto"): what zo_deepspeed.initialize needs
    part = fill_placeholders(shipped_ds("zero3_hpz"))
    assert part["zero_optimization"]["zero_hpz_partition_size"] == 4 and part["train_batch_size"] == "auto"
    # explicit arguments win over the environment
    assert fill_auto(shipped_ds("zero3_hpz"), 1, 1, 8, gpus_per_node=8)["zero_optimization"][
        "zero_hpz_partition_size"] == 8
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.delenv("ZO_NVME_PATH")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="zero_hpz_partition_size is \"auto\" but GPUs per node are unknown"):
        fill_auto(shipped_ds("zero3_hpz"), 1, 1, 8)
    with pytest.raises(ValueError, match="nvme_path is \"auto\": set ZO_NVME_PATH"):
        fill_auto(shipped_ds("zero3_nvme"), 1, 1, 2)


def test_default_configs_elsewhere_in_the_repo_validate():
    from zo_deepspeed.run_config import DEFAULT_DS_CONFIG

    validate_ds_config(fill_auto(DEFAULT_DS_CONFIG, 4, 1, 2), world_size=2)


# -- the key lists are DeepSpeed's ---------------------------------------------------------------

def test_key_lists_match_installed_deepspeed():
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.offload_config import DeepSpeedZeroOffloadParamConfig

    names = set()
    for n, f in DeepSpeedZeroConfig.model_fields.items():
        names |= {n, f.alias} - {None}
    assert set(ZERO_KEYS) == names
    assert set(OFFLOAD_PARAM_KEYS) == set(DeepSpeedZeroOffloadParamConfig.model_fields)

    # every top-level key DeepSpeedConfig looks up, recorded by a dict that watches its lookups
    seen: set = set()

    class Keys:
        def __init__(self, d):
            self.d = d

        def __contains__(self, k):
            seen.add(k)
            return k in self.d

        def __iter__(self):
            return iter(self.d)

        def __len__(self):
            return len(self.d)

    class Watch(dict):
        def __getitem__(self, k):
            seen.add(k)
            return super().__getitem__(k)

        def get(self, k, *a):
            seen.add(k)
            return super().get(k, *a)

        def __contains__(self, k):
            seen.add(k)
            return super().__contains__(k)

        def keys(self):
            return Keys(dict(self))

    DeepSpeedConfig(Watch({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}))
    read = {k for k in seen if isinstance(k, str)}
    assert read - REMOVED_TOP_LEVEL_KEYS == set(TOP_LEVEL_KEYS) - {"sequence_parallel_size"}
    assert REMOVED_TOP_LEVEL_KEYS <= read  # DeepSpeed still checks for them (and refuses them)


# -- one clear line per mistake --------------------------------------------------------------------

BAD = [
    ("optimizer", dict(z3(), optimizer={"type": "AdamW", "params": {"lr": 1e-5}}), 2, None,
     "'optimizer' block: zeroth-order training uses none; delete the block"),
    ("scheduler", dict(z3(), scheduler={"type": "WarmupLR"}), 2, None, "'scheduler' block"),
    ("typo_top", {"zero_optimisation": {"stage": 3}}, 2, None,
     "unknown ds_config key 'zero_optimisation': did you mean 'zero_optimization'?"),
    ("unknown_top", dict(z3(), my_setting=1), 2, None, "unknown ds_config key 'my_setting'"),
    ("removed_top", dict(z3(), elasticity={"enabled": True}), 2, None, "'elasticity' was removed from DeepSpeed"),
    ("typo_zero", z3(stage3_param_persistance_threshold=0), 2, None,
     "zero_optimization.stage3_param_persistance_threshold: did you mean 'stage3_param_persistence_threshold'?"),
    ("alias_twice", z3(stage3_param_persistence_threshold=0, param_persistence_threshold=10), 2, None,
     "sets both 'param_persistence_threshold' and its alias 'stage3_param_persistence_threshold'"),
    ("deprecated", z3(cpu_offload_param=True), 2, None,
     "zero_optimization.cpu_offload_param is deprecated; use zero_optimization.offload_param"),
    ("typo_offload", z3(offload_param={"device": "cpu", "pin_memry": True}), 2, None,
     "offload_param.pin_memry: did you mean 'pin_memory'?"),
    ("stage1", {"zero_optimization": {"stage": 1}}, 2, None, "zero_optimization.stage=1 partitions optimizer state"),
    ("stage2", {"zero_optimization": {"stage": 2}}, 2, None, "zero_optimization.stage=2 partitions optimizer state"),
    ("stage_str", {"zero_optimization": {"stage": "3"}}, 2, None, "zero_optimization.stage='3' must be the integer"),
    ("quantized", z3(zero_quantized_weights=True), 2, None,
     "zero_optimization.zero_quantized_weights quantizes each gathered weight to int8"),
    ("offload_optimizer", z3(offload_optimizer={"device": "cpu"}), 2, None,
     "zero_optimization.offload_optimizer: ZO training has no optimizer state"),
    ("offload_stage0", {"zero_optimization": {"stage": 0, "offload_param": {"device": "cpu"}}}, 2, None,
     "offload_param.device='cpu' needs zero_optimization.stage=3"),
    ("nvme_no_path", z3(offload_param={"device": "nvme"}), 2, None,
     "offload_param.device=nvme needs offload_param.nvme_path"),
    ("hpz_world", z3(zero_hpz_partition_size=3), 4, None,
     "zero_hpz_partition_size=3 does not divide the world size 4"),
    ("hpz_node", z3(zero_hpz_partition_size=4), 16, 8, None),  # 4 divides 8: fine
    ("hpz_straddle", z3(zero_hpz_partition_size=6), 24, 8, "does not fit 8 GPUs per node"),
    ("hpz_stage0", {"zero_optimization": {"stage": 0, "zero_hpz_partition_size": 2}}, 2, None,
     "zero_hpz_partition_size=2 needs zero_optimization.stage=3"),
    ("hpz_nvme", z3(zero_hpz_partition_size=2, offload_param={"device": "nvme", "nvme_path": "/x"}), 2, None,
     "zero_hpz_partition_size > 1 with offload_param.device=nvme"),
    ("both_half", dict(z3(), fp16={"enabled": True}, bf16={"enabled": True}), 2, None,
     "enables both fp16 and bf16; keep one"),
    ("batch", {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
               "zero_optimization": {"stage": 3}}, 2, None,
     "train_batch_size=10 but train_micro_batch_size_per_gpu=2 x gradient_accumulation_steps=2 x world size 2 = 8"),
    ("batch_two", {"train_batch_size": 6, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}},
     2, None, "train_batch_size=6 is not a multiple of train_micro_batch_size_per_gpu=4 x world size 2"),
    ("batch_zero", {"train_micro_batch_size_per_gpu": 0, "zero_optimization": {"stage": 3}}, 2, None,
     "train_micro_batch_size_per_gpu=0 must be a positive integer"),
    ("other_auto", dict(z3(), gradient_clipping="auto"), 2, None,
     "gradient_clipping is \"auto\", which zo_deepspeed does not fill"),
    ("nested_auto", z3(stage3_prefetch_bucket_size="auto"), 2, None,
     "zero_optimization.stage3_prefetch_bucket_size is \"auto\""),
]


@pytest.mark.parametrize("case,cfg,world,gpn,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_one_line_error(case, cfg, world, gpn, needle):
    if needle is None:
        validate_ds_config(cfg, world_size=world, gpus_per_node=gpn)
        return
    with pytest.raises(ValueError) as e:
        validate_ds_config(cfg, world_size=world, gpus_per_node=gpn)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert needle in msg, msg


def test_fill_auto_refuses_values_that_contradict_the_trainer():
    cfg = dict(z3(), train_micro_batch_size_per_gpu=4)
    with pytest.raises(ValueError, match=r"train_micro_batch_size_per_gpu=4 but the trainer's micro batch is 2; "
                                         r"set train_micro_batch_size_per_gpu to \"auto\""):
        fill_auto(cfg, micro_batch=2, grad_accum=1, world_size=2)
    ok = fill_auto(dict(z3(), train_micro_batch_size_per_gpu=2), micro_batch=2, grad_accum=3, world_size=2)
    assert (ok["gradient_accumulation_steps"], ok["train_batch_size"]) == (3, 12)
    original = z3()
    fill_auto(original, 1, 1, 2)
    assert "train_batch_size" not in original  # not modified in place


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ds_config .*nope.json does not exist"):
        load_ds_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "zero_optimization": {\n    "stage": 3,\n  }\n}\n')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON: .* at line 4 column 3"):
        load_ds_config(bad)
    dup = tmp_path / "dup.json"
    dup.write_text('{"zero_optimization": {"stage": 0, "stage": 3}}')
    with pytest.raises(ValueError, match="key 'stage' appears twice"):
        load_ds_config(dup)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_ds_config(lst)
    d = {"zero_optimization": {"stage": 3}}
    got = load_ds_config(d)
    got["zero_optimization"]["stage"] = 0
    assert d["zero_optimization"]["stage"] == 3


# -- every shipped file runs -------------------------------------------------------------------

def dtype_of(name: str) -> str:
    return "bfloat16" if "bf16" in name else ("float16" if "fp16" in name else "float32")


@pytest.mark.dist
def test_shipped_configs_run_on_two_ranks(tmp_path, ranks):
    # a tiny Llama whose tied embedding (8192 x 128) gives 1 MiB+ partitions at 2 ranks in fp32 and bf16,
    # so NVMe offload really swaps it (smaller partitions stay in host memory)
    model = tmp_path / "llama"
    tiny_llama(save_to=model, vocab_size=8192, hidden_size=128, intermediate_size=256)
    batches = save_batches(tmp_path / "b.pt", 8192, n_steps=2, batch=4)
    from deepspeed.accelerator import get_accelerator

    # fp16 runs where the accelerator computes in it (on the CPU: only CPUs with fp16 arithmetic); elsewhere
    # the fp16 files must be refused in one line before any model loads (asserted below)
    fp16_ok = get_accelerator().is_fp16_supported()
    run_here = [n for n in RUN_HERE if fp16_ok or "fp16" not in n]
    scs = []
    for name in run_here:
        cfg = filled_ds(name, nvme_path=str(tmp_path / "nvme"))
        if "nvme" in name:
            # the shipped 5 x 1e8-element swap buffers are sized for real models
            cfg["zero_optimization"]["offload_param"].update(buffer_count=4, buffer_size=2_000_000)
        validate_ds_config(cfg, world_size=2)
        scs.append(scenario(name, model, cfg, ZO_EAGER, tmp_path / "b.pt", tmp_path, dtype=dtype_of(name)))
    ranks(2, scs, tmp_path)

    # one torch thread: see harness.reference_engine
    refs = {"float32": reference(model, ZO_EAGER, batches, threads=1)}
    for dt in ("bfloat16", "float16") if fp16_ok else ("bfloat16",):  # 16-bit: the ranks' forward shapes
        refs[dt] = reference(model, ZO_EAGER, batches, dtype=getattr(torch, dt), shards=2, threads=1)
    for name in run_here:
        dt = dtype_of(name)
        if dt == "float32":
            got = compare(tmp_path / name, *refs[dt])
        else:
            got = worker_result(tmp_path / name)
            compare_steps(got["steps"], refs[dt][0], rel=1e-3, g=False, what=name)
            assert got["base_bytes"] > 0  # 16-bit partitions get an exact-restore copy (zo.restore=auto)
        kind = {"zero0": "replica"}.get(name.split("_")[0], "zero3-hpz" if "hpz" in name else "zero3")
        assert got["kind"].startswith(kind), (name, got["kind"])
        if "nvme" in name:
            assert got["kind"] == "zero3-nvme" and got["nvme_swapped"] >= 1, (name, got)
    for name in (n for n in RUN_HERE if n not in run_here):  # fp16 without fp16 arithmetic: one clear line
        p = subprocess.run(deepspeed_cmd(2, free_port(), str(DIST / "run_zo.py"), "--spec", str(write_spec(
            tmp_path / f"{name}.json", [scenario(name, model, filled_ds(name), ZO_EAGER, tmp_path / "b.pt", tmp_path,
                                                 dtype="float16")]))),
            env=repo_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert p.returncode != 0 and "enables fp16, which DeepSpeed's cpu accelerator does not support" in tail(p), \
            tail(p)
