from __future__ import annotations

import pytest
import torch
import transformers as T

from engramlab import Trace, record
from engramlab.errors import PointError
from tests.conftest import VOCAB, make_tiny, tiny_text


def _forward(lm, text, **kw):
    return lm.model(**lm.tokenize(text), **kw)


def test_captured_resid_and_embed_match_hidden_states(tiny):
    text = tiny_text()
    points = ["embed"] + [f"resid.{i}" for i in range(tiny.n_layers - 1)]
    rec = record(tiny, text, points)
    with torch.no_grad():
        hs = _forward(tiny, text, output_hidden_states=True).hidden_states
    assert torch.allclose(rec["embed"], hs[0], atol=1e-5)
    for i in range(tiny.n_layers - 1):
        assert torch.allclose(rec[f"resid.{i}"], hs[i + 1], atol=1e-5)


@pytest.mark.parametrize("layer", [1, 2])
def test_a_pass_started_at_a_block_from_its_input_state_finishes_as_the_full_pass(tiny, layer):
    from engramlab.trace import run_model

    ids = tiny.tokenize([tiny_text(), tiny_text(seed=1)])["input_ids"]
    last = f"resid.{tiny.n_layers - 1}"
    with torch.no_grad(), Trace(tiny).capture(f"resid.{layer - 1}", last, "embed") as full:
        run_model(tiny, ids)
    seen = []
    handle = tiny.layout.block(0).register_forward_hook(lambda *a: seen.append(0))
    with torch.no_grad(), Trace(tiny).capture(last) as part:
        run_model(tiny, ids, start=(layer, full[f"resid.{layer - 1}"]))
    assert torch.allclose(part[last], full[last], atol=1e-5)
    assert not seen  # the blocks before the start did not run
    with torch.no_grad():
        run_model(tiny, ids)
    handle.remove()
    assert seen == [0]  # afterwards the model runs every block again
    with torch.no_grad(), Trace(tiny).capture(last) as other:  # another input state: not a no-op
        run_model(tiny, ids, start=(layer, full["embed"]))
    assert not torch.allclose(other[last], full[last], atol=1e-3)


MIXED_ATTENTION = {  # sliding windows shorter than the text, so the two kinds of layer differ
    "gemma2": lambda: T.Gemma2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64,
                                     vocab_size=VOCAB, head_dim=8, sliding_window=2),
    "gemma3_text": lambda: T.Gemma3TextConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, head_dim=8, sliding_window=2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "qwen2": lambda: T.Qwen2Config(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64,
                                   vocab_size=VOCAB, use_sliding_window=True, sliding_window=2,
                                   max_window_layers=1),
}


@pytest.mark.parametrize("family", sorted(MIXED_ATTENTION))
def test_a_pass_started_mid_model_keeps_each_blocks_own_attention_kind(family):
    """Models whose blocks alternate full and sliding-window attention pick a block's mask (and
    Gemma 3 its rotary table) by its place in the loop: starting at block 1 must still give
    block 1 its own kind, not block 0's."""
    from engramlab.trace import run_model

    lm = make_tiny(family, config=MIXED_ATTENTION[family]())
    kinds = lm.model.config.layer_types
    assert kinds[0] != kinds[1]  # the premise: the first two blocks differ
    ids = lm.tokenize([tiny_text(10), tiny_text(10, seed=1)])["input_ids"]
    last = f"resid.{lm.n_layers - 1}"
    with torch.no_grad(), Trace(lm).capture("resid.0", last) as full:
        run_model(lm, ids)
    with torch.no_grad(), Trace(lm).capture(last) as part:
        run_model(lm, ids, start=(1, full["resid.0"]))
    assert torch.allclose(part[last], full[last], atol=1e-5)
    assert lm.model.config.layer_types == kinds  # restored


def test_mlp_key_through_value_weight_gives_mlp_out(tiny):
    rec = record(tiny, tiny_text(), ["mlp_key.1", "mlp_out.1"])
    module = tiny.layout.value_module(1)
    bias = getattr(module, "bias", None)
    out = rec["mlp_key.1"] @ tiny.layout.value_weight(1).T + (bias if bias is not None else 0)
    assert rec["mlp_key.1"].shape[-1] == tiny.d_mlp
    assert torch.allclose(out, rec["mlp_out.1"], atol=1e-5)


def test_add_at_one_position_changes_only_that_position_and_later(tiny):
    text = tiny_text(8)
    with torch.no_grad():
        base = _forward(tiny, text).logits
        with Trace(tiny).add("resid.0", 3 * torch.randn(tiny.d_model), positions=4):
            edited = _forward(tiny, text).logits
    assert torch.allclose(base[:, :4], edited[:, :4], atol=1e-6)
    assert not torch.allclose(base[:, 4:], edited[:, 4:], atol=1e-3)


def test_per_row_positions_and_replace_with_captured_value_is_identity(tiny):
    texts = [tiny_text(6, seed=1), tiny_text(6, seed=2)]
    enc = tiny.tokenize(texts)
    with torch.no_grad():
        base = tiny.model(**enc).logits
        with Trace(tiny).capture("attn_out.1") as tr:
            tiny.model(**enc)
        with Trace(tiny).replace("attn_out.1", tr["attn_out.1"]):
            same = tiny.model(**enc).logits
        with Trace(tiny).add("mlp_out.0", torch.randn(2, tiny.d_model), positions=[[1], [3, 4]]):
            moved = tiny.model(**enc).logits
    assert torch.allclose(base, same, atol=1e-6)
    assert torch.allclose(base[0, :1], moved[0, :1], atol=1e-6)
    assert not torch.allclose(base[0, 1], moved[0, 1], atol=1e-4)
    assert torch.allclose(base[1, :3], moved[1, :3], atol=1e-6)
    assert not torch.allclose(base[1, 3], moved[1, 3], atol=1e-4)


def test_gradients_flow_through_an_added_vector(tiny):
    delta = torch.zeros(tiny.d_model, requires_grad=True)
    with Trace(tiny).add("mlp_out.1", delta, positions=-1).capture("resid.2", detach=False) as tr:
        logits = _forward(tiny, tiny_text()).logits
    logits[0, -1, 5].backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert tr["resid.2"].requires_grad


def test_hooks_are_removed_when_the_body_raises(tiny):
    text = tiny_text()
    with torch.no_grad():
        base = _forward(tiny, text).logits
    with pytest.raises(RuntimeError), Trace(tiny).add("resid.0", torch.ones(tiny.d_model)):
        raise RuntimeError("boom")
    with torch.no_grad():
        after = _forward(tiny, text).logits
    assert torch.equal(base, after)
    assert all(not m._forward_hooks and not m._forward_pre_hooks
               for m in tiny.model.modules())


@pytest.mark.parametrize("point", ["resid.3", "mlp_key.-1", "nonsense.1", "resid", "embed.0"])
def test_bad_point_names_are_clear_errors(tiny, point):
    with pytest.raises(PointError) as err:
        Trace(tiny).capture(point)
    assert point in str(err.value)


def test_position_out_of_range_is_reported(tiny):
    with pytest.raises(PointError, match="out of range"), torch.no_grad(), \
            Trace(tiny).add("resid.0", torch.ones(tiny.d_model), positions=[[40]]):
        _forward(tiny, tiny_text(5))


@pytest.mark.embedded
def test_embedded_keys_in_a_padded_batch_match_a_plain_forward(smol):
    """Keys captured by Trace in a right-padded batch equal the keys the MLP computes from its
    own sub-modules (act(gate(x)) * up(x)) in an unpadded forward of each prompt."""
    prompts = ["The Eiffel Tower is located in the city of", "Paris is", "The capital of Japan"]
    layer = 8
    mlp = smol.layout.mlp(layer)
    enc = smol.tokenize(prompts)
    with torch.no_grad(), Trace(smol).capture(f"mlp_key.{layer}") as tr:
        smol.model(**enc)
    seen: dict[str, torch.Tensor] = {}

    def grab(_m, args, _o):
        seen["x"] = args[0]

    for row, prompt in enumerate(prompts):
        handle = mlp.register_forward_hook(grab)
        try:
            with torch.no_grad():
                smol.model(**smol.tokenize(prompt))
        finally:
            handle.remove()
        x = seen["x"][0]
        with torch.no_grad():
            keys = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        n = int(enc["attention_mask"][row].sum())
        assert n == keys.shape[0]
        assert torch.allclose(tr[f"mlp_key.{layer}"][row, :n], keys, atol=1e-4)
