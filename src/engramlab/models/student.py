"""A smaller model cut from a larger one: the same embeddings, final norm and unembedding, and a
chosen subset of its blocks, in order (DistilBERT's initialisation, as POST uses for its
distilled source model). The layer count lives under a different config key per family, and
models with mixed attention keep a per-layer list of types; both are handled here."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from ..errors import InputError
from .layout import Layout
from .lm import LM

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def keep_layers(lm: LM, layers: Sequence[int], *, name: str | None = None) -> LM:
    """A new model (weights copied) with only ``layers`` of ``lm``'s blocks, renumbered from 0."""
    layers = [lm.layout.check_layer(int(i)) for i in layers]
    if not layers or sorted(set(layers)) != layers:
        raise InputError(f"student layers {layers} must be distinct and increasing, e.g. "
                         f"0,{lm.n_layers // 2},{lm.n_layers - 1}")
    model = copy.deepcopy(lm.model)
    parent_path, _, attr = lm.layout.spec.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, attr)
    kept = nn.ModuleList([full[i] for i in layers])
    for new_index, block in enumerate(kept):
        for module in block.modules():  # the KV cache is indexed by each attention's layer_idx
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(parent, attr, kept)
    config = model.config
    for key in LAYER_COUNT_KEYS:
        if hasattr(config, key) and isinstance(getattr(config, key), int):
            setattr(config, key, len(layers))
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == lm.n_layers:
        config.layer_types = [types[i] for i in layers]
    return LM(model=model, tokenizer=lm.tokenizer, layout=Layout(model),
              name=name or f"{lm.label}-student{len(layers)}")
