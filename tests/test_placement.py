"""Models spread over devices (accelerate's dispatch) and half-precision weights.

With a GPU present the split is real (blocks on the CPU and on cuda:0, activations moving
between them); without one every part lies on the CPU and the tests still run accelerate's
hooks around every block, which is what the rest of the library meets in either case.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engramlab import EditRequest, Trace, load_model
from engramlab.data import TextCorpus
from engramlab.delta import ParamDelta, WeightDelta
from engramlab.edit import ROME
from engramlab.edit.targets import TargetConfig, optimise_targets
from engramlab.errors import DeltaMismatchError
from engramlab.models import LM, Layout
from engramlab.models.placement import dispatch
from engramlab.stats import KeyStats, collect_key_stats
from engramlab.trace import run_model
from tests.conftest import make_tiny, tiny_text

CUDA = torch.cuda.is_available()
SECOND = "cuda:0" if CUDA else "cpu"
CORPUS = TextCorpus([tiny_text(40, seed=s) for s in range(6)], name="tiny")
REQUEST = EditRequest(prompt="w1 {} w2 w3", subject="w5 w6", target_new="w40",
                      target_true="w41")


def _psd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or 3 * d, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1] * 100


def split(lm: LM) -> LM:
    """A copy of ``lm`` whose embedding, first block and head stay on the CPU and whose later
    blocks run on the second device, each module executing where it lies."""
    from accelerate import dispatch_model

    model = copy.deepcopy(lm.model)
    layout = Layout(model)
    blocks = [layout.module_name(b) for b in layout.blocks]
    device_map = {name: ("cpu" if i == 0 else SECOND) for i, name in enumerate(blocks)}
    for name in model.state_dict():
        if not any(name.startswith(b + ".") for b in blocks):
            device_map[name.rsplit(".", 1)[0]] = "cpu"
    model = dispatch_model(model, device_map=device_map, main_device="cpu")
    return LM(model=model, tokenizer=lm.tokenizer, layout=Layout(model), name=lm.name + "-split")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_split_model_reads_what_the_whole_one_reads(family):
    lm = make_tiny(family)
    parted = split(lm)
    assert parted.layout.device_of(2) == torch.device(SECOND)
    ids = lm.tokenize(["w1 w5 w6 w2 w3", "w7 w8"])
    points = ("mlp_key.1", "resid.2", "attn_out.0")
    with Trace(lm).capture(*points) as whole, torch.no_grad():
        full = lm.model(**ids).logits
    with Trace(parted).capture(*points) as part, torch.no_grad():
        got = parted.model(**ids).logits
    for point in points:
        assert part[point].device == lm.device
        torch.testing.assert_close(part[point], whole[point], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    mask = ids["attention_mask"]
    want = lm.logits_from_hidden(lm.last_hidden(mask, input_ids=ids["input_ids"]), [5, 9])
    hidden = parted.last_hidden(mask, input_ids=ids["input_ids"])
    torch.testing.assert_close(parted.logits_from_hidden(hidden, tokens=[5, 9]), want,
                               rtol=1e-5, atol=1e-5)


def test_statistics_of_a_split_model_equal_the_whole_ones(isolated_cache):
    lm = make_tiny("llama")
    settings = {"n_tokens": 96, "batch_size": 2, "seq_len": 16, "progress": False,
                "use_cache": False}
    whole = collect_key_stats(lm, [0, 2], CORPUS, **settings)
    part = collect_key_stats(split(lm), [0, 2], CORPUS, **settings)
    for layer in (0, 2):
        assert part[layer].count == whole[layer].count > 0
        torch.testing.assert_close(part[layer].moment(), whole[layer].moment(), rtol=1e-5,
                                   atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_targets_on_a_split_model_see_and_move_what_the_whole_model_does(family):
    """The target optimisation's forward (prefix cache, passes that start at the edited
    block) reads the same losses on a split model, and its gradient reaches δ through the
    second device. The optimised δ itself is not compared: Adam's first steps follow the signs
    of near-zero gradient entries, so a last-bit change of the weights alone moves it."""
    lm = make_tiny(family)
    parted = split(lm)
    frozen = TargetConfig(steps=3, lr=0.0, early_stop=0.0)
    want = optimise_targets(lm, [REQUEST], "mlp_out.1", ["{}", "w9 {}"], frozen)
    got = optimise_targets(parted, [REQUEST], "mlp_out.1", ["{}", "w9 {}"], frozen)
    torch.testing.assert_close(got.nll, want.nll, rtol=1e-5, atol=1e-5)
    moving = TargetConfig(steps=10, lr=0.5, clamp=1e3, early_stop=0.0, kl_factor=0.0,
                          weight_decay=0.0)
    moved = optimise_targets(parted, [REQUEST], "mlp_out.1", ["{}", "w9 {}"], moving)
    assert float(moved.delta.norm()) > 0
    assert float(moved.nll[0]) < float(got.nll[0]) - 5e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_edit_applies_to_a_split_model_as_to_the_whole_one(family, isolated_cache):
    lm = make_tiny(family)
    parted = split(lm)
    stats = {2: KeyStats(2, _psd(lm.d_mlp, 2), 100)}
    delta = ROME(layers=[2], key_stats=stats, templates=[], target={"steps": 4}).edit(lm,
                                                                                  REQUEST)
    name = lm.layout.value_param_name(2)
    weight = dict(parted.model.named_parameters())[name]
    assert weight.device == torch.device(SECOND)
    before = weight.detach().clone()
    ids = lm.tokenize("w1 w5 w6 w2")
    with delta.applied(parted), torch.no_grad():
        assert not torch.equal(weight, before)
        edited = parted.model(**ids).logits
    with delta.applied(lm), torch.no_grad():
        torch.testing.assert_close(edited, lm.model(**ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight, before)


@pytest.mark.skipif(not CUDA, reason="offloading streams weights to a GPU")
def test_an_offloaded_layer_is_read_but_refuses_an_edit_with_the_fix():
    lm = make_tiny("llama")
    model = copy.deepcopy(lm.model)
    blocks = Layout(model)
    device_map = {name.rsplit(".", 1)[0]: "cuda:0" for name in model.state_dict()}
    device_map = {k: v for k, v in device_map.items()
                  if not k.startswith(blocks.module_name(blocks.blocks[1]))}
    device_map[blocks.module_name(blocks.blocks[1])] = "cpu"
    parted = LM(model=dispatch(model, device_map, torch.float32), tokenizer=lm.tokenizer,
                layout=Layout(model), name="offloaded")
    assert parted.layout.device_of(1) == torch.device("cuda:0")
    with Trace(parted).capture("mlp_key.1") as tr, torch.no_grad():
        run_model(parted, parted.tokenize("w1 w2")["input_ids"])
    assert tr["mlp_key.1"].shape[-1] == lm.d_mlp
    name = parted.layout.value_param_name(1)
    delta = WeightDelta({name: ParamDelta(u=torch.ones(lm.d_model, 1),
                                          v=torch.ones(lm.d_mlp, 1))})
    with pytest.raises(DeltaMismatchError, match="offloaded"):
        delta.apply(parted, force=True)


def test_half_precision_weights_take_an_edit_with_a_single_rounding():
    lm = make_tiny("llama")
    lm.model.to(torch.bfloat16)
    name = lm.layout.value_param_name(1)
    weight = dict(lm.model.named_parameters())[name]
    before = weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(weight.shape[0], 1, generator=g), torch.randn(weight.shape[1], 1,
                                                                     generator=g) * 1e-2
    delta = WeightDelta({name: ParamDelta(u=u, v=v)})
    delta.apply(lm, force=True)
    assert torch.equal(weight, (before.float() + u @ v.T).to(torch.bfloat16))
    delta.revert(lm)
    assert torch.equal(weight, before)


def test_load_model_places_a_folder_by_device_map(tmp_path):
    lm = make_tiny("gpt2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    placed = load_model(tmp_path, device_map="auto", progress=False)
    assert placed.model.hf_device_map
    plain = load_model(tmp_path, device="cpu", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(placed.model(**placed.tokenize("w1 w2 w3")).logits.cpu(),
                                   plain.model(**plain.tokenize("w1 w2 w3")).logits)
    with pytest.raises(ValueError, match="not both"):
        load_model(tmp_path, device="cpu", device_map="auto", progress=False)
    with pytest.raises(ValueError, match="unknown device_map"):
        load_model(tmp_path, device_map="everywhere", progress=False)


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_multi_layer_editors_run_on_a_split_model(method, isolated_cache):
    """MEMIT and AlphaEdit read keys and residuals at layers on both devices and write a
    layer on each; their delta does to the split model what it does to the whole one."""
    from engramlab.edit import get_editor

    lm = make_tiny("llama")
    parted = split(lm)
    # rank d/2: AlphaEdit's null space of the preserved keys is then not empty
    stats = {layer: KeyStats(layer, _psd(lm.d_mlp, layer, lm.d_mlp // 2), 100)
             for layer in (0, 1)}
    editor = get_editor(method, layers=[0, 1], key_stats=stats, templates=[],
                        target={"steps": 6, "clamp": 1e3})
    delta = editor.edit(parted, [REQUEST])
    names = [lm.layout.value_param_name(layer) for layer in (0, 1)]
    assert set(delta.entries) == set(names)
    assert all(float(delta.entries[n].to_dense().norm()) > 0 for n in names)
    ids = lm.tokenize("w1 w5 w6 w2")
    with delta.applied(parted), torch.no_grad():
        edited = parted.model(**ids).logits
    with delta.applied(lm), torch.no_grad():
        torch.testing.assert_close(edited, lm.model(**ids).logits, rtol=1e-5, atol=1e-5)


def test_a_tuned_lens_fitted_on_bfloat16_weights_keeps_float32_parameters(tmp_path, capsys):
    import json
    import math

    from safetensors.torch import load_file

    from engramlab.cli import main
    from tests.conftest import tiny_text

    src = make_tiny("llama").save(tmp_path / "src")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(tiny_text(150, seed=s) for s in range(6)))
    args = ["--model", str(src), "--corpus", str(corpus), "--dtype", "bfloat16"]
    assert main(["lens", "train", *args, "--kind", "tuned", "--tokens", "512",
                 "--out", str(tmp_path / "lens"), "--json"]) == 0
    capsys.readouterr()
    weights = load_file(tmp_path / "lens" / "lens.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    assert any(float(t.abs().max()) > 0 for t in weights.values())  # it was fitted
    assert main(["lens", "eval", *args, "--lens", str(tmp_path / "lens"), "--tokens", "256",
                 "--skip", "512", "--json"]) == 0
    kl = json.loads(capsys.readouterr().out)["lenses"]["tuned"]["kl"]
    assert len(kl) == 3 and all(math.isfinite(v) for v in kl)  # read through bf16 blocks


def test_deltaedit_runs_sequential_steps_on_a_split_model(isolated_cache):
    """DeltaEdit keeps its past update on the host and reads new keys on the device of the
    last edited layer; with a zero-width band the steps after the band's first spread are
    projected, and each step's delta on the split model is the whole model's."""
    from engramlab.edit import DeltaEdit

    lm = make_tiny("llama")
    parted = split(lm)
    stats = {layer: KeyStats(layer, _psd(lm.d_mlp, layer, lm.d_mlp // 2), 100)
             for layer in (0, 1)}

    def steps(model: LM) -> tuple[list, object]:
        editor = DeltaEdit(layers=[0, 1], key_stats=stats, templates=[],
                           target={"steps": 6, "clamp": 1e3}, nullspace_threshold=1e-8,
                           band={"width": 0.0, "warmup": 0, "floor": 0.0, "space": 0.5})
        state, deltas = None, []
        for subject, target in (("w5 w6", "w40"), ("w7", "w42"), ("w8", "w43"), ("w9", "w44"),
                                ("w10 w11", "w45")):
            request = EditRequest(prompt="w1 {} w2 w3", subject=subject, target_new=target,
                                  target_true="w41")
            delta, state = editor.step(model, [request], state)
            delta.apply(model, force=True)
            deltas.append(delta)
        for delta in reversed(deltas):
            delta.revert(model)
        return deltas, state

    split_deltas, split_state = steps(parted)
    whole_deltas, whole_state = steps(lm)
    assert split_state.band["projected"] == whole_state.band["projected"] >= 1
    for a, b in zip(split_deltas, whole_deltas, strict=True):
        for name, entry in b.entries.items():
            torch.testing.assert_close(a.entries[name].to_dense().cpu(), entry.to_dense(),
                                       rtol=1e-4, atol=1e-6)


def test_a_prefix_is_read_and_trained_on_a_split_model_as_on_the_whole_one():
    from engramlab.prompt import label_ids
    from engramlab.prompt.prefix import initial_prefix, prefix_logits

    lm = make_tiny("llama")
    parted = split(lm)
    states = initial_prefix(lm, 3, seed=1)
    assert torch.allclose(initial_prefix(parted, 3, seed=1), states, atol=1e-5)
    texts, ids = ["w5 w6 w7", "w8 w9"], label_ids(lm, ["w40", "w41"])
    grads = []
    for model in (lm, parted):
        s = states.clone().requires_grad_(True)
        logits = prefix_logits(model, s, texts, ids)
        logits.sum().backward()
        grads.append((logits.detach().cpu(), s.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
