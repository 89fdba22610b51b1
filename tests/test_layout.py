from __future__ import annotations

import pytest
import torch
import transformers as T

from engramlab.errors import PointError, UnsupportedArchitectureError
from engramlab.models import Layout, LayoutSpec, register_layout, supported_architectures
from tests.conftest import FAMILIES, make_tiny, tiny_text


def test_every_family_resolves_sizes_and_value_weight_view(tiny):
    lay = tiny.layout
    assert lay.n_layers == 3
    w = lay.value_weight(1)
    assert tuple(w.shape) == (lay.d_model, lay.d_mlp)
    stored = dict(tiny.model.named_parameters())[lay.value_param_name(1)]
    assert w.data_ptr() == stored.data_ptr(), "value weight must be a view, never a copy"


def test_square_conv1d_is_transposed_by_type_not_shape():
    cfg = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=32, vocab_size=100, n_positions=64)
    lm = make_tiny("gpt2", config=cfg)
    module = lm.layout.value_module(0)
    assert module.weight.shape[0] == module.weight.shape[1]
    assert lm.layout.value_is_transposed(0)
    assert torch.equal(lm.layout.value_weight(0), module.weight.T)
    keys = torch.randn(5, 32)
    # the [d_model, d_mlp] view must act on keys exactly like the module does
    assert torch.allclose(module(keys) - module.bias, keys @ lm.layout.value_weight(0).T,
                          atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_value_weight_view_maps_keys_like_the_module(family):
    lm = make_tiny(family)
    module = lm.layout.value_module(2)
    keys = torch.randn(4, lm.d_mlp)
    bias = getattr(module, "bias", None)
    out = module(keys) - (bias if bias is not None else 0)
    assert torch.allclose(out, keys @ lm.layout.value_weight(2).T, atol=1e-5)


def test_logits_from_hidden_of_last_block_equals_model_logits(tiny):
    from engramlab import record

    text = tiny_text()
    rec = record(tiny, text, [f"resid.{tiny.n_layers - 1}"])
    with torch.no_grad():
        logits = tiny.model(**tiny.tokenize(text)).logits
        lens = tiny.logits_from_hidden(rec[f"resid.{tiny.n_layers - 1}"])
    assert torch.allclose(lens, logits, atol=1e-4)


def test_unknown_architecture_lists_supported_and_how_to_register():
    cfg = T.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                       intermediate_size=64, vocab_size=100)
    model = T.BertForMaskedLM(cfg)
    with pytest.raises(UnsupportedArchitectureError) as err:
        Layout(model)
    msg = str(err.value)
    assert "'bert'" in msg and "gpt2" in msg and "llama" in msg and "register_layout" in msg


def test_register_layout_teaches_a_new_model_type():
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    cfg.model_type = "my_llama_variant"
    model = T.LlamaForCausalLM(cfg)
    with pytest.raises(UnsupportedArchitectureError):
        Layout(model)
    register_layout("my_llama_variant", LayoutSpec(
        blocks="model.layers", attn="self_attn", mlp="mlp", mlp_value="mlp.down_proj",
        final_norm="model.norm", embed="model.embed_tokens"))
    assert "my_llama_variant" in supported_architectures()
    assert Layout(model).d_mlp == 64


def test_layer_out_of_range_is_a_clear_error(tiny):
    with pytest.raises(PointError, match="out of range: this model has 3 layers"):
        tiny.layout.block(7)
    assert tiny.layout.check_layer(-1) == 2
