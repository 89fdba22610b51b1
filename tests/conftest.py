"""Shared fixtures: tiny random models of every supported family (no download) and the
embedded SmolLM2 (loaded once per session, from the user's cache when present)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers

from engramlab.models import LM, Layout

# Under pytest-xdist (`-n N`) the workers share the cores: cores ÷ N intra-op threads each keeps
# N processes from running N × cores threads.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1)
                              // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

VOCAB = 100
WORDS = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(VOCAB - 3)]

TINY_CONFIGS = {
    "gpt2": lambda: T.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                 bos_token_id=2, eos_token_id=2),
    "gptj": lambda: T.GPTJConfig(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64,
                                 rotary_dim=4, bos_token_id=2, eos_token_id=2),
    "gpt_neox": lambda: T.GPTNeoXConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=VOCAB, bos_token_id=2,
                                        eos_token_id=2),
    "llama": lambda: T.LlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB),
    "mistral": lambda: T.MistralConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64,
                                       vocab_size=VOCAB),
    "qwen2": lambda: T.Qwen2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB),
    "gemma": lambda: T.GemmaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                   head_dim=8),
    "gemma2": lambda: T.Gemma2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB, head_dim=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(num_hidden_layers=3, hidden_size=32,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              intermediate_size=64, vocab_size=VOCAB, head_dim=8),
}
FAMILIES = sorted(TINY_CONFIGS)


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                     eos_token="[EOS]")


def make_tiny(family: str, seed: int = 0, config: T.PretrainedConfig | None = None) -> LM:
    torch.manual_seed(seed)
    cfg = config or TINY_CONFIGS[family]()
    cfg.pad_token_id = 1
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    model.requires_grad_(False)
    return LM(model=model, tokenizer=tiny_tokenizer(), layout=Layout(model), name=f"tiny-{family}")


def tiny_text(n: int = 6, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g))


def tiny_facts_file(path: Path, n: int) -> Path:
    """``n`` CounterFact-style cases in the tiny vocabulary (w-words), as a JSONL file."""
    import json

    path.write_text("\n".join(json.dumps(
        {"prompt": f"w1 {{}} w2 w{3 + i}", "subject": f"w{5 + i}", "target_new": f"w{40 + i}",
         "target_true": f"w{60 + i}", "paraphrase_prompts": [f"w9 w{5 + i} w2"]})
        for i in range(n)))
    return path


def assert_halves(lm: LM, concept, delta) -> dict:
    """The papers' erasure result on one concept: its probes at most half as often answered,
    paraphrases fewer, controls under 10 points down, perplexity under 10 % up. Returns the
    figures after erasure."""
    from engramlab.data.concepts import controls_for, general_text
    from engramlab.erase.run import behaviour

    controls, neutral = controls_for(concept), general_text(split="eval")
    pre = behaviour(lm, concept, controls, neutral)
    with delta.applied(lm):
        post = behaviour(lm, concept, controls, neutral)
    assert post["target_accuracy"] <= 0.5 * pre["target_accuracy"]
    assert pre["control_accuracy"] - post["control_accuracy"] < 0.10
    assert post["perplexity"] < 1.10 * pre["perplexity"]
    assert post["paraphrase_accuracy"] < pre["paraphrase_accuracy"]
    return {"pre": pre, "post": post}


@pytest.fixture(params=FAMILIES)
def tiny(request: pytest.FixtureRequest) -> LM:
    return make_tiny(request.param)


@pytest.fixture(scope="session")
def smol() -> LM:
    from engramlab import load_model

    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENGRAMLAB_CACHE", str(cache))
    return cache


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Keep CI logs quiet and deterministic.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A test that takes the embedded model is an embedded test, whether or not it says so:
    # `-m "not embedded"` must never load SmolLM2.
    for item in items:
        if "smol" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.embedded)
