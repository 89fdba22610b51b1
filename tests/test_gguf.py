"""The GGUF path on a tiny file written here (the `gguf` package can write one): dequantize
once, cache as safetensors, reload from the cache, rebuild a corrupt cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from engramlab import load_model

gguf = pytest.importorskip("gguf")

V, D, F, L, H, KV = 64, 32, 64, 2, 4, 2


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF; FFN weights stored as Q8_0 so loading must dequantize them."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(ord("a") + i) for i in range(26)]
    tokens += [f"w{i}" for i in range(V - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * V)
    w.add_token_scores([0.0] * V)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    originals: dict[str, np.ndarray] = {}

    def tensor(name: str, shape: tuple[int, ...], quantize: bool = False) -> None:
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        originals[name] = data
        if quantize:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)

    tensor("token_embd.weight", (V, D))
    tensor("output_norm.weight", (D,))
    tensor("output.weight", (V, D))
    for i in range(L):
        tensor(f"blk.{i}.attn_norm.weight", (D,))
        tensor(f"blk.{i}.ffn_norm.weight", (D,))
        tensor(f"blk.{i}.attn_q.weight", (D, D))
        tensor(f"blk.{i}.attn_k.weight", (KV * D // H, D))
        tensor(f"blk.{i}.attn_v.weight", (KV * D // H, D))
        tensor(f"blk.{i}.attn_output.weight", (D, D))
        tensor(f"blk.{i}.ffn_gate.weight", (F, D), quantize=True)
        tensor(f"blk.{i}.ffn_up.weight", (F, D), quantize=True)
        tensor(f"blk.{i}.ffn_down.weight", (D, F), quantize=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_is_dequantized_once_then_loaded_from_cache(tiny_gguf, isolated_cache):
    path, originals = tiny_gguf
    first = load_model(str(path), progress=False, device="cpu")
    down = first.layout.value_weight(1).numpy()
    # Q8_0 keeps ~2-3 significant digits: dequantized, not raw bytes, and close to the source
    assert np.abs(down - originals["blk.1.ffn_down.weight"]).max() < 5e-3
    assert first.folder is not None and first.folder.parent == isolated_cache / "models"
    assert (first.folder / "model.safetensors").is_file()

    second = load_model(str(path), progress=False, device="cpu")
    assert second.folder == first.folder
    assert second.fingerprint() == first.fingerprint()
    ids = second.tokenize("a b c")["input_ids"]
    assert ids.tolist() == [[3, 4, 5]]


def test_processes_loading_one_gguf_at_once_dequantize_it_once(tiny_gguf, isolated_cache,
                                                                monkeypatch):
    import threading

    import engramlab.models.gguf as module

    path, _ = tiny_gguf
    built, real = [], module._write_cache

    def slow_write(*args, **kwargs):  # a build long enough for the other loader to arrive
        built.append(threading.get_ident())
        threading.Event().wait(0.3)
        real(*args, **kwargs)

    monkeypatch.setattr(module, "_write_cache", slow_write)
    folders: list = []
    loaders = [threading.Thread(target=lambda: folders.append(
        module.load_gguf(path, dtype=torch.float32)[2])) for _ in range(2)]
    for t in loaders:
        t.start()
    for t in loaders:
        t.join()
    # the second waited for the first's build and loaded it, instead of building it again
    assert len(built) == 1 and len(folders) == 2 and folders[0] == folders[1]
    assert (folders[0] / "model.safetensors").is_file()


def test_gguf_model_saves_as_a_plain_folder(tiny_gguf, isolated_cache, tmp_path):
    lm = load_model(str(tiny_gguf[0]), progress=False, device="cpu")
    out = lm.save(tmp_path / "plain")
    again = load_model(str(out), progress=False, device="cpu")
    with torch.no_grad():
        a = lm.model(**lm.tokenize("a b c d")).logits
        b = again.model(**again.tokenize("a b c d")).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_corrupt_cache_is_reported_and_rebuilt(tiny_gguf, isolated_cache, caplog):
    path, _ = tiny_gguf
    lm = load_model(str(path), progress=False, device="cpu")
    weights = lm.folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING):
        again = load_model(str(path), progress=False, device="cpu")
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert weights.stat().st_size == size
    assert again.fingerprint() == lm.fingerprint()


def test_changed_gguf_file_gets_a_new_cache_entry(tmp_path, isolated_cache):
    path = tmp_path / "m.gguf"
    write_tiny_gguf(path)
    a = load_model(str(path), progress=False, device="cpu")
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes(8)  # change the last tensor's bytes: same size, different content
    path.write_bytes(bytes(raw))
    b = load_model(str(path), progress=False, device="cpu")
    assert a.folder != b.folder
    assert a.fingerprint() != b.fingerprint()
