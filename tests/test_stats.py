from __future__ import annotations

import logging

import pytest
import torch

from engramlab.data import TextCorpus
from engramlab.errors import CacheError, PointError
from engramlab.stats import KeyStats, _cache_path, collect_key_stats
from engramlab.trace import Trace
from tests.conftest import make_tiny, tiny_text

CORPUS = TextCorpus([tiny_text(40, seed=s) for s in range(6)], name="tiny")


def _count_forwards(lm, monkeypatch):
    """Forward passes, counted where every pass starts: the first block."""
    calls = {"n": 0}

    def counted(*_):
        calls["n"] += 1

    lm.layout.block(0).register_forward_hook(counted)
    return calls


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_collection_stops_after_the_deepest_layer_it_needs(family, isolated_cache):
    lm = make_tiny(family)
    ran = {"later_blocks": 0, "unembed": 0}
    lm.layout.block(2).register_forward_hook(lambda *_: ran.__setitem__(
        "later_blocks", ran["later_blocks"] + 1))
    lm.model.get_output_embeddings().register_forward_hook(lambda *_: ran.__setitem__(
        "unembed", ran["unembed"] + 1))
    stats = collect_key_stats(lm, [1, 0], CORPUS, n_tokens=64, batch_size=2, seq_len=16,
                              progress=False)
    assert ran == {"later_blocks": 0, "unembed": 0}
    rows = CORPUS.token_rows(lm, seq_len=16)[:4]
    with torch.no_grad(), Trace(lm).capture("mlp_key.1") as tr:
        lm.model(input_ids=rows)  # the full model, for reference
    k = tr["mlp_key.1"].reshape(-1, lm.d_mlp).double()
    # float32 keys: the stopped and the full forward may round differently (1e-7 relative)
    assert torch.allclose(stats[1].moment(), k.T @ k / 64, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_moment_equals_explicit_keys_second_moment(family, isolated_cache):
    lm = make_tiny(family)
    stats = collect_key_stats(lm, [0, 2], CORPUS, n_tokens=128, batch_size=2, seq_len=16,
                              progress=False)
    rows = CORPUS.token_rows(lm, seq_len=16)[:8]
    with torch.no_grad(), Trace(lm).capture("mlp_key.2") as tr:
        lm.model(input_ids=rows)
    k = tr["mlp_key.2"].reshape(-1, lm.d_mlp).double()
    assert stats[2].count == 128
    assert torch.allclose(stats[2].moment(), k.T @ k / 128, atol=1e-10)
    assert stats[0].sum.dtype == torch.float64


def test_all_layers_in_one_pass_then_from_cache(isolated_cache, monkeypatch):
    lm = make_tiny("llama")
    calls = _count_forwards(lm, monkeypatch)
    first = collect_key_stats(lm, [0, 1, 2], CORPUS, n_tokens=96, batch_size=2, seq_len=16,
                              progress=False)
    assert calls["n"] == 3  # 6 rows of 16 tokens in batches of 2, shared by the three layers
    again = collect_key_stats(lm, [2, 0], CORPUS, n_tokens=96, batch_size=2, seq_len=16,
                              progress=False)
    assert calls["n"] == 3  # nothing recomputed
    assert torch.equal(again[2].sum, first[2].sum) and list(again) == [2, 0]


def test_changed_weights_or_corpus_miss_the_cache(isolated_cache, monkeypatch):
    lm = make_tiny("llama")
    calls = _count_forwards(lm, monkeypatch)
    kw = {"n_tokens": 32, "batch_size": 2, "seq_len": 16, "progress": False}
    collect_key_stats(lm, [1], CORPUS, **kw)
    other = TextCorpus(CORPUS.documents[::-1])
    collect_key_stats(lm, [1], other, **kw)
    assert calls["n"] == 2
    with torch.no_grad():
        lm.layout.value_weight(0)[0, 0] += 0.5
    collect_key_stats(lm, [1], CORPUS, **kw)
    assert calls["n"] == 3


def test_corrupt_or_mismatched_cache_file_is_recomputed(isolated_cache, caplog):
    lm = make_tiny("gpt2")
    kw = {"n_tokens": 32, "batch_size": 2, "seq_len": 16, "progress": False}
    good = collect_key_stats(lm, [1], CORPUS, **kw)[1]
    path = _cache_path(good.key)
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        again = collect_key_stats(lm, [1], CORPUS, **kw)[1]
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert torch.equal(again.sum, good.sum)
    # a valid file stored under another key at this path must not be used either
    stale = KeyStats(1, torch.eye(lm.d_mlp, dtype=torch.float64), 5, {**good.key, "model": "x"})
    stale.save(path)
    with pytest.raises(CacheError, match="another key"):
        KeyStats.load(path, expect=good.key)
    assert torch.equal(collect_key_stats(lm, [1], CORPUS, **kw)[1].sum, good.sum)


def test_shards_merge_exactly():
    lm = make_tiny("llama")
    a = TextCorpus(CORPUS.documents[:3])
    b = TextCorpus(CORPUS.documents[3:])
    kw = {"n_tokens": 10_000, "batch_size": 4, "seq_len": 8, "progress": False,
          "use_cache": False}
    sa = collect_key_stats(lm, [1], a, **kw)[1]
    sb = collect_key_stats(lm, [1], b, **kw)[1]
    merged = sa.merge(sb)
    assert merged.count == sa.count + sb.count
    assert torch.allclose(merged.sum, sa.sum + sb.sum)
    with pytest.raises(CacheError, match="cannot merge"):
        sa.merge(KeyStats(0, sb.sum, sb.count, sb.key))


def test_layer_out_of_range_is_rejected():
    with pytest.raises(PointError, match="out of range"):
        collect_key_stats(make_tiny("llama"), [5], CORPUS, progress=False)


def test_keyed_cache_entries_are_per_key_and_rejected_entries_are_rebuilt(isolated_cache):
    from engramlab._io import keyed_path, read_cached
    from engramlab.errors import CacheError

    a = keyed_path("things", "x", {"n": 1, "m": [1, 2]}, ".txt")
    assert a == keyed_path("things", "x", {"m": [1, 2], "n": 1}, ".txt")  # key order: same
    assert a != keyed_path("things", "x", {"n": 2, "m": [1, 2]}, ".txt")
    assert a.parent == isolated_cache / "things" and a.name.startswith("x-")

    def load(path):
        text = path.read_text()
        if text != "good":
            raise CacheError(f"{path} is bad")
        return text

    assert read_cached(a, load) is None  # absent
    a.write_text("good")
    assert read_cached(a, load) == "good"
    a.write_text("bad")
    assert read_cached(a, load) is None and not a.exists()  # rejected: deleted, rebuilt


def test_statistics_split_over_worker_processes_equal_one_process(tmp_path, isolated_cache):
    from engramlab import load_model

    lm = load_model(str(make_tiny("llama").save(tmp_path / "tiny")), device="cpu",
                    progress=False)
    corpus = TextCorpus([tiny_text(300, seed=s) for s in range(6)], name="tiny-text")
    kw = dict(n_tokens=1200, batch_size=2, seq_len=32, use_cache=False, progress=False)
    one = collect_key_stats(lm, [0, 2], corpus, **kw)
    two = collect_key_stats(lm, [0, 2], corpus, workers=2, **kw)
    for layer in (0, 2):
        assert two[layer].count == one[layer].count == 1216  # 19 rows of 32: whole batches
        assert float(one[layer].sum.abs().max()) > 0
        assert torch.allclose(two[layer].sum, one[layer].sum, rtol=1e-10, atol=0)
    # an edited model in the parent is not what the workers would load: refused
    with torch.no_grad():
        lm.layout.value_weight(0).add_(1.0)
    with pytest.raises(CacheError, match="other weights"):
        collect_key_stats(lm, [0], corpus, workers=2, **kw)


def test_processes_asking_for_the_same_statistics_at_once_collect_them_once(
        isolated_cache, monkeypatch):
    import threading

    import engramlab.stats as module

    lm = make_tiny("llama")
    corpus = TextCorpus([tiny_text(200, seed=s) for s in range(3)], name="tiny-text")
    passes, real = [], module._accumulate

    def slow(*args, **kwargs):  # long enough for the other caller to arrive
        passes.append(threading.get_ident())
        threading.Event().wait(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_accumulate", slow)
    got: list = []
    callers = [threading.Thread(target=lambda: got.append(collect_key_stats(
        lm, [0, 1], corpus, n_tokens=256, batch_size=2, seq_len=32, progress=False)))
        for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    # the second waited for the first pass and read its statistics back from the cache
    assert len(passes) == 1 and len(got) == 2
    assert torch.equal(got[0][1].sum, got[1][1].sum) and got[0][1].count == got[1][1].count


def test_engram_stats_prints_its_figures_and_fills_the_cache(tmp_path, isolated_cache, capsys):
    import json

    from engramlab.cli import main

    folder = make_tiny("llama").save(tmp_path / "tiny")
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(tiny_text(200, seed=s) for s in range(4)))
    argv = ["stats", "--model", str(folder), "--layers", "0", "1", "--tokens", "256",
            "--seq-len", "32", "--corpus", str(corpus), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"layers", "tokens", "seconds", "tokens_per_s", "workers"}
    assert out["layers"] == [0, 1] and out["tokens"] == 256 and out["workers"] == 1
    assert len(list((isolated_cache / "stats").rglob("*.safetensors"))) == 2
    assert main([*argv[:-1], "--layers", "7"]) == 2  # a layer the model lacks


def test_engram_stats_in_bfloat16_accumulates_close_to_float32(tmp_path, isolated_cache,
                                                                capsys):
    from engramlab.cli import main
    from engramlab.models.loading import load_model

    folder = make_tiny("llama").save(tmp_path / "tiny")
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(tiny_text(200, seed=s) for s in range(4)))
    common = ["--layers", "1", "--tokens", "256", "--seq-len", "32", "--corpus", str(corpus),
              "--json"]
    assert main(["stats", "--model", str(folder), "--dtype", "bfloat16", *common]) == 0
    assert main(["stats", "--model", str(folder), *common]) == 0
    capsys.readouterr()
    read = {}
    for dtype in ("bfloat16", "float32"):
        lm = load_model(folder, dtype=dtype, device="cpu", progress=False)
        read[dtype] = collect_key_stats(lm, [1], TextCorpus.from_path(corpus), n_tokens=256,
                                        seq_len=32, progress=False)[1]  # from the cache
        assert read[dtype].sum.dtype == torch.float64
    half, full = read["bfloat16"].moment(), read["float32"].moment()
    apart = float((half - full).norm() / full.norm())
    assert 0 < apart < 0.05  # bf16 keys (8-bit mantissa), summed in float64


def test_engram_stats_refuses_workers_with_a_device_map(tmp_path, capsys):
    from engramlab.cli import main
    from engramlab.cli.common import DEVICE_MAPS
    from engramlab.models.placement import AUTO_MAPS

    assert DEVICE_MAPS == AUTO_MAPS
    argv = ["stats", "--model", str(tmp_path / "none"), "--layers", "0", "--workers", "2",
            "--device-map", "auto"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--workers" in err and "--device-map" in err
