"""Fine-tuning as a WeightDelta: what trains, what comes back, and that PEFT agrees."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engramlab.adapt import FinetuneConfig, finetune, trainable_names
from engramlab.data.corpus import TextCorpus
from engramlab.errors import RequestError
from tests.conftest import make_tiny, tiny_text


def _corpus() -> TextCorpus:
    return TextCorpus([tiny_text(40, seed=s) for s in range(8)], name="tiny")


def _loss(lm, rows) -> float:
    with torch.no_grad():
        logits = lm.model(input_ids=rows).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()))


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_finetune_returns_its_change_and_leaves_the_model_as_it_was(family):
    lm = make_tiny(family)
    corpus = _corpus()
    rows = corpus.token_rows(lm, seq_len=16)
    before, loss0 = _weights(lm), _loss(lm, rows)
    cfg = FinetuneConfig(steps=8, lr=3e-3, batch_size=4, seq_len=16)
    result = finetune(lm, corpus, cfg)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert not lm.model.training
    assert result.losses[-1] < result.losses[0]
    with result.delta.applied(lm):
        assert _loss(lm, rows) < loss0 - 0.05  # the delta is the training
    again = finetune(lm, corpus, cfg)  # seeded: the same change
    for name, entry in result.delta.entries.items():
        assert torch.allclose(entry.to_dense(), again.delta.entries[name].to_dense(), atol=1e-6)


def test_restricted_modes_train_only_their_parameters():
    lm = make_tiny("llama")
    edited = [lm.layout.value_param_name(1)]
    names = [n for n, _ in lm.model.named_parameters()]
    assert trainable_names(lm, "edited", edited) == edited
    assert set(trainable_names(lm, "non-edited", edited)) == set(names) - set(edited)
    cfg = FinetuneConfig(mode="edited", steps=3, lr=1e-2, batch_size=2, seq_len=16)
    only = finetune(lm, _corpus(), cfg, edited=edited).delta
    assert list(only.entries) == edited
    assert float(only.entries[edited[0]].to_dense().abs().max()) > 0
    rest = finetune(lm, _corpus(), FinetuneConfig(mode="non-edited", steps=3, lr=1e-2,
                                                   batch_size=2, seq_len=16),
                    edited=edited).delta
    assert edited[0] not in rest.entries
    with pytest.raises(RequestError, match="needs the edit"):
        trainable_names(lm, "edited")
    with pytest.raises(RequestError, match="unknown fine-tuning mode"):
        FinetuneConfig(mode="qlora")


@pytest.mark.parametrize(("family", "mode"), [("llama", "lora"), ("gpt2", "lora"),
                                               ("llama", "dora")])
def test_adapter_delta_matches_the_adapter_peft_loads_back(family, mode, tmp_path):
    from peft import PeftModel

    lm = make_tiny(family)
    corpus = _corpus()
    rows = corpus.token_rows(lm, seq_len=16)
    before = _weights(lm)
    cfg = FinetuneConfig(mode=mode, steps=6, lr=5e-3, batch_size=4, seq_len=16, rank=4)
    result = finetune(lm, corpus, cfg, adapter_out=tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert not lm.model.training  # dropout stays off, as before the fine-tune
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    if mode == "lora":
        assert all(e.is_low_rank and e.u.shape[1] == 4 for e in result.delta.entries.values())
    with result.delta.applied(lm), torch.no_grad():
        ours = lm.model(input_ids=rows).logits
    base = make_tiny(family)  # the same weights, wrapped by peft from the saved folder
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base.model, str(tmp_path / "adapter"))(
            input_ids=rows).logits
        plain = lm.model(input_ids=rows).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapter did something
    assert torch.allclose(ours, theirs, atol=1e-4)
