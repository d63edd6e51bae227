"""LoRA and prefix tuning (zo_deepspeed.adapters, through peft): only the adapter is perturbed and updated.

Each mode at 2 real ZeRO-3 ranks must match its single-process run (losses, g, adapter weights), leave every
base weight bit-identical, be reproduced by replaying its trajectory log on the base model, and export
something loadable (LoRA: merged HF weights; prefix: a peft adapter folder).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from harness import (Z3, Z3_T0, compare_steps, read_trajectory, reference_engine, rel_err, replayed, run_cli,
                     save_batches, scenario, tiny_llama, tiny_opt, worker_result, worker_weights)
from zo_deepspeed.adapters import AdapterConfig, adapt, adapter_of, prepare
from zo_deepspeed.partitions import Partitions
from zo_deepspeed.run_config import load_run_config

# Z3 (default persistence threshold): the adapter parameters are persistent; Z3_T0: partitioned
LORA = {"mode": "lora", "init_seed": 3}
PREFIX = {"mode": "prefix", "init_seed": 5}


def _zo(mode: str) -> dict:
    # MeZO's defaults for the mode, with a few more steps' worth of lr so that tiny runs move measurably
    # (partition mode: test_perturb.py compares perturb-on-read adapters against it)
    d = AdapterConfig(mode=mode).zo_defaults()
    return {**d, "lr": d["lr"] * 10, "weight_decay": 0.1, "seed": 7, "perturb": "partition"}


def _base_name(name: str, mode: str) -> str | None:
    """peft name of a base parameter -> its name in the plain model (None for adapter parameters)."""
    if ".lora_" in name or name.startswith("prompt_encoder."):
        return None
    pre = "base_model.model." if mode == "lora" else "base_model."  # LoRA: PeftModel > LoraModel > model
    assert name.startswith(pre), name
    return name[len(pre):].replace(".base_layer.", ".")


# -- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, needle", [
    ({"mode": "adalora"}, "adapter.mode"), ({"lora_r": 0}, "adapter.lora_r"), ({"prefix_tokens": -1}, "prefix_tokens"),
    ({"prefix_init": "text"}, "prefix_init"), ({"lora_targets": " , "}, "lora_targets"),
    ({"init_seed": -1}, "init_seed"),
])
def test_config_checks(kw, needle):
    with pytest.raises(ValueError, match=needle):
        AdapterConfig(**kw)


def test_run_config_mode_defaults_and_overrides(tmp_path):
    assert (load_run_config().zo.lr, load_run_config().zo.eps) == (1e-5, 1e-3)  # full-parameter: unchanged
    c = load_run_config(None, ["adapter.mode=lora"])
    assert (c.zo.lr, c.zo.eps, c.zo.restore) == (1e-4, 1e-2, "master")
    assert c.adapter.lora_r == 8 and c.adapter.lora_alpha == 16
    c = load_run_config(None, ["adapter.mode=prefix", "zo.lr=1e-3", "zo.restore=inplace"])  # explicit wins
    assert (c.zo.lr, c.zo.eps, c.zo.restore, c.adapter.prefix_tokens) == (1e-3, 1e-1, "inplace", 5)
    f = tmp_path / "run.yaml"
    f.write_text("adapter:\n  mode: lora\n  lora_targets: q_proj,k_proj,v_proj\nzo:\n  eps: 0.001\n")
    c = load_run_config(f)
    assert c.adapter.targets() == ["q_proj", "k_proj", "v_proj"] and (c.zo.lr, c.zo.eps) == (1e-4, 1e-3)
    with pytest.raises(ValueError, match="adapter has"):
        load_run_config(None, ["adapter.rank=4"])


def test_only_adapter_params_are_trainable_and_bad_targets_fail():
    m = adapt(tiny_llama(), AdapterConfig(mode="lora"))
    names = [n for n, _ in Partitions(m).params]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n not in names)
    p = adapt(tiny_opt(), AdapterConfig(mode="prefix"))
    assert [n for n, _ in Partitions(p).params] == ["prompt_encoder.default.embedding.weight"]
    assert adapter_of(p).mode == "prefix" and adapter_of(tiny_opt()) is None
    with pytest.raises(ValueError, match="lora_targets"):
        adapt(tiny_llama(), AdapterConfig(mode="lora", lora_targets="c_attn"))


@pytest.mark.parametrize("build", [tiny_llama, tiny_opt])
def test_prefix_init_is_the_real_activations_of_random_tokens(build):
    """MeZO's prefix init: the prefixed model on x equals the base model on (random tokens ++ x)."""
    base = build().eval()
    m = adapt(build(), AdapterConfig(mode="prefix", init_seed=11)).eval()
    prepare(m)
    toks = torch.randint(0, base.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(11))
    x = torch.randint(0, 100, (2, 9))
    full = torch.cat([toks.expand(2, -1), x], 1)
    with torch.no_grad():
        want = base(input_ids=full, attention_mask=torch.ones_like(full)).logits[:, 5:]
        got = m(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- 2 ZeRO-3 ranks vs one process, base weights, replay, export -----------------------------------------
@pytest.mark.dist
def test_two_zero3_ranks_match_one_process(model_dirs, tmp_path, ranks):
    opt, llama = model_dirs["opt"], model_dirs["llama"]
    bo, bl = tmp_path / "bo.pt", tmp_path / "bl.pt"
    batches = {str(opt): save_batches(bo, 128, n_steps=3), str(llama): save_batches(bl, 1000, n_steps=3)}
    cases = {  # name: (model, ds_config, adapter, batches file)
        "lora_llama": (llama, Z3, LORA, bl),
        "prefix_llama": (llama, Z3, PREFIX, bl),
        "prefix_opt_t0": (opt, Z3_T0, PREFIX, bo),
    }
    ranks(2, [scenario(k, m, ds, _zo(a["mode"]), b, tmp_path, adapter=a) for k, (m, ds, a, b) in cases.items()],
          tmp_path, worker="run_adapters.py")

    for name, (model_dir, _, adapter, _) in cases.items():
        zo = _zo(adapter["mode"])
        # one process, no DeepSpeed, fed the ranks' shards as micro-batches: the same forward shapes, so the
        # same rounding (adapters start at or near 0, so their relative error is g's, which 1/(2 eps) amplifies)
        ref_steps, ref = reference_engine(model_dir, zo, batches[str(model_dir)], shards=2, adapter=adapter)
        got = worker_result(tmp_path / name)
        assert got["kind"] == "zero3" and got["world"] == 2
        trainable = [n for n, _ in ref.parts.params]
        # the ZO state edits exactly the adapter's parameters, each a ZeRO-3 partition
        assert got["edited"] == trainable == got["partitioned"], name
        assert all(_base_name(n, adapter["mode"]) is None for n in trainable)
        compare_steps(got["steps"], ref_steps, rel=1e-6, what=name)
        live = worker_weights(tmp_path / name)
        ref_w = {n: p.detach() for n, p in ref.module.named_parameters()}
        assert set(live) == set(ref_w)
        orig = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
        init = _initial(model_dir, adapter)
        for n, w in ref_w.items():
            b = _base_name(n, adapter["mode"])
            if b is None:  # adapter: trained, and the same at 2 ranks as in one process
                assert not torch.equal(w, init[n]), f"{name}: {n} did not move"
                # losses agree to ~1e-8 (fp32 GEMM rounding); g = dL/(2 eps) turns that into ~1e-5 relative,
                # and an adapter that starts at 0 (LoRA's B) is nothing but sum(lr g z): so 1e-4, not 1e-6
                assert rel_err(live[n], w) <= 1e-4, f"{name}: {n}"
            else:  # base: bit-identical after training, in both runs
                assert torch.equal(live[n], orig[b].detach()), f"{name}: base {b} changed at 2 ranks"
                assert torch.equal(w, orig[b].detach()), f"{name}: base {b} changed in one process"

        # the 2-rank log replayed in one process on the plain base model: same adapter
        rep = replayed(model_dir, tmp_path / f"{name}.traj.jsonl")
        assert adapter_of(rep).to_dict() == AdapterConfig(**adapter).to_dict()
        for n, w in rep.named_parameters():
            if adapter["mode"] == "lora" or _base_name(n, "prefix") is not None:
                # base weights; LoRA: init from the seed, same seeds and g, exact (master) restore
                assert torch.equal(live[n], w.detach()), f"{name}: replay differs in {n}"
            else:  # the prefix init is a forward, here of 1 process instead of 2 ZeRO-3 ranks: fp32 rounding
                assert rel_err(live[n], w.detach()) <= 1e-6, f"{name}: {n}"

        _check_export(tmp_path / f"{name}.export", model_dir, adapter["mode"], ref.module)


def _initial(model_dir, adapter) -> dict:
    m = adapt(AutoModelForCausalLM.from_pretrained(model_dir), AdapterConfig(**adapter))
    prepare(m)
    return {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}


def _check_export(folder, model_dir, mode, trained):
    x = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        want = trained.eval()(input_ids=x, attention_mask=torch.ones_like(x)).logits
    if mode == "lora":  # merged: a plain HF folder
        assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
        m = AutoModelForCausalLM.from_pretrained(folder)
    else:  # a peft adapter folder over the base model
        from peft import PeftModel

        assert (folder / "adapter_model.safetensors").exists() and not (folder / "model.safetensors").exists()
        m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder)
    with torch.no_grad():
        got = m.eval()(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- the trainer and CLI: the mode from the config, in the log header, reproduced by `replay` ------------
ARGS = ["data.num_train=16", "data.num_dev=4", "data.num_test=8", "data.max_length=48", "train.batch_size=4",
        "train.eval_batch_size=8", "train.zero_shot_eval=false", "train.steps=3", "model.dtype=float32"]


@pytest.mark.dist
def test_cli_train_and_replay(tiny_lm_dir, tmp_path):
    """One mode through the CLI (prefix: its init is data-dependent and its export is the adapter folder);
    the CLI's plumbing is the same for LoRA, whose merged export the 2-rank test checks."""
    mode = "prefix"
    run, out = tmp_path / "run", tmp_path / "replayed"
    run_cli(["train", f"model.path={tiny_lm_dir}", *ARGS, f"adapter.mode={mode}", "adapter.init_seed=2",
             f"train.output_dir={run}"])
    header, _ = read_trajectory(run / "trajectory.jsonl")
    assert header["adapter"]["mode"] == mode and header["adapter"]["init_seed"] == 2
    rec = AdapterConfig(mode=mode).zo_defaults()
    assert (header["zo"]["lr"], header["zo"]["eps"]) == (rec["lr"], rec["eps"])  # MeZO's defaults for the mode
    ck = load_file(next((run / "checkpoints").glob("step_*/rank*.safetensors")))
    assert ck and all(".lora_" in k or "prompt_encoder" in k for k in ck)  # checkpoints hold the adapter only
    run_cli(["replay", "--model", str(tiny_lm_dir), "--log", str(run / "trajectory.jsonl"), "--out", str(out)])
    live, rep = (load_file(d / "adapter_model.safetensors") for d in (run / "export", out))
    assert set(live) == set(rep) == {"prompt_embeddings"}
    # same process count and layout as the live run: the replayed prefix is the live one, bit for bit
    assert torch.equal(rep["prompt_embeddings"], live["prompt_embeddings"])
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
