from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import torch

from engramlab import load_model
from engramlab.errors import ModelNotFoundError
from tests.conftest import make_tiny, tiny_text


def test_unknown_model_name_lists_registry():
    with pytest.raises(ModelNotFoundError, match="gpt2-xl"):
        load_model("no-such-model")


def test_missing_folder_and_missing_gguf_are_clear(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "deeper"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_offline_hub_id_fails_fast_naming_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("some-org/some-model-that-is-not-cached")
    assert time.perf_counter() - t < 10
    assert "some-org/some-model-that-is-not-cached" in str(err.value)
    assert "folder" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="openai-community/gpt2-xl"):
        load_model("gpt2-xl")


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_save_and_load_folder_round_trip(tmp_path, family):
    lm = make_tiny(family)
    out = lm.save(tmp_path / "m")
    again = load_model(str(out), device="cpu", progress=False)
    text = tiny_text()
    with torch.no_grad():
        a = lm.model(**lm.tokenize(text)).logits
        b = again.model(**again.tokenize(text)).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert again.fingerprint() == lm.fingerprint()
    with pytest.raises(FileExistsError, match="source model folder"):
        again.save(out)
    with pytest.raises(FileExistsError, match="not empty"):
        lm.save(out)


@pytest.mark.embedded
def test_embedded_model_loads_from_cache_and_knows_paris(smol):
    assert smol.n_layers == 30 and smol.d_model == 576 and smol.d_mlp == 1536
    top = smol.top_tokens("The Eiffel Tower is located in the city of", k=1)
    assert top[0][0] == " Paris"
    manifest = json.loads((smol.folder / "engramlab-cache.json").read_text())
    assert manifest["sha256"] and "model.safetensors" in manifest["files"]


@pytest.mark.embedded
def test_gguf_loaded_model_saves_as_plain_folder(smol, tmp_path):
    out = smol.save(tmp_path / "plain")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    again = load_model(str(out), device="cpu", progress=False)
    assert again.fingerprint() == smol.fingerprint()


@pytest.mark.embedded
def test_truncated_gguf_cache_is_detected_and_rebuilt(smol, isolated_cache, caplog):
    """A corrupt cache entry is reported and rebuilt, never used (this re-dequantizes: ~30 s)."""
    from engramlab.models.gguf import cache_folder_for

    src = smol.folder
    gguf = __import__("pathlib").Path(smol.source)
    target = cache_folder_for(gguf)
    shutil.copytree(src, target)
    weights = target / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    with caplog.at_level(logging.WARNING):
        lm = load_model("smollm2-135m", progress=False)
    assert any("corrupt" in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records)
    assert lm.fingerprint() == smol.fingerprint()
    assert weights.stat().st_size == (src / "model.safetensors").stat().st_size


def test_labels_name_a_model_without_its_path(tmp_path):
    lm = make_tiny("llama")
    lm.name = str(lm.save(tmp_path / "deep" / "my-model"))
    assert lm.label == "my-model"
    lm.name = "org/some-model"  # a hub id is kept whole
    assert lm.label == "org/some-model"


def test_next_token_logits_equal_the_full_models_at_each_last_real_token(tiny):
    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9"]
    enc = tiny.tokenize(prompts)
    with torch.no_grad():
        full = tiny.model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    torch.testing.assert_close(tiny.next_token_logits(prompts),
                               full[torch.arange(3), last].float(), rtol=1e-5, atol=1e-5)


def test_frozen_weights_restore_each_flag_also_after_an_error():
    lm = make_tiny("llama")
    params = list(lm.model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 2 == 0)
    with pytest.raises(RuntimeError), lm.frozen_weights():
        assert not any(p.requires_grad for p in params)
        raise RuntimeError("step failed")
    assert [p.requires_grad for p in params] == [i % 2 == 0 for i in range(len(params))]
