"""Key/value caches across transformers versions: running a prefix into a cache, continuing
from it, and reaching the tensors inside. Everything that differs between versions is here."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .lm import LM


def prefill(lm: LM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            position_ids: torch.Tensor) -> Any:
    """Run the model's body over ``input_ids`` and return its key/value cache."""
    out = lm.body(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids, use_cache=True)
    cache = out.get("cache", None)  # transformers >= 5.2x names it cache
    return out.past_key_values if cache is None else cache


def extend(lm: LM, cache: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           position_ids: torch.Tensor) -> None:
    """Run the body over ``input_ids`` after the tokens held in ``cache`` (which grows)."""
    body = lm.body
    body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
         use_cache=True, **{_cache_argument(type(body)): cache})


@functools.cache
def _cache_argument(module_type: type[torch.nn.Module]) -> str:
    """The name under which this transformers version's forward takes a KV cache: ``cache``
    in recent versions (``past_key_values`` is deprecated there, to be removed in 5.40), and
    ``past_key_values`` before. Looked up once per model class: :func:`extend` is called every
    optimisation step."""
    params = inspect.signature(module_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def crop_each(cache: Any, width: int) -> None:
    """Cut every layer of ``cache`` back to its first ``width`` tokens. Each layer is measured
    on its own: a pass that skips the first blocks (:func:`engramlab.trace.started_at`) grows
    only the layers it runs."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # transformers < 4.56: lists of key and value tensors
        map_cache(cache, lambda t: t[..., :width, :])
        return
    for layer in layers:
        extra = layer.get_seq_length() - width
        if extra > 0:  # a negative count removes tokens in every version that has layers
            layer.crop(-extra)


def map_cache(cache: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace every key and value tensor of a transformers cache by ``fn(tensor)``, in the
    cache layout of any transformers version."""
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys = fn(layer.keys)
                layer.values = fn(layer.values)
        return
    for name in ("key_cache", "value_cache"):  # transformers < 4.56
        tensors = getattr(cache, name, None)
        if tensors is not None:
            tensors[:] = [fn(t) for t in tensors]


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every block's (keys, values), each ``[batch, kv_heads, tokens, head_dim]``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers < 4.56


def cache_from(lm: LM, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A cache holding these (keys, values) per block, as if their tokens had been run; the
    tensors are kept as they are (gradients flow back into them through a later pass)."""
    from transformers import DynamicCache

    # a model split over devices reads each block's cache where that block computes
    placed = [(k.to(lm.layout.device_of(i)), v.to(lm.layout.device_of(i)))
              for i, (k, v) in enumerate(layers)]
    try:
        cache = DynamicCache(config=lm.config)  # per-layer kinds (sliding windows) from config
    except TypeError:  # transformers < 4.56
        return DynamicCache.from_legacy_cache(tuple(placed))
    for i, (k, v) in enumerate(placed):
        where = {"cache_position": torch.arange(k.shape[-2], device=k.device)}
        cache.update(k, v, i, cache_kwargs=where)
    return cache


_GEOMETRY: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, int]] = \
    weakref.WeakKeyDictionary()


def kv_geometry(lm: LM) -> tuple[int, int]:
    """(key/value heads, head width) of the cache every block keeps, read off a one-token pass
    (what attention really stores, whatever the config calls it); once per model."""
    if lm.model not in _GEOMETRY:
        _GEOMETRY[lm.model] = _measure_geometry(lm)
    return _GEOMETRY[lm.model]


def _measure_geometry(lm: LM) -> tuple[int, int]:
    ids = torch.zeros(1, 1, dtype=torch.long, device=lm.device)
    with torch.no_grad():
        cache = prefill(lm, ids, torch.ones_like(ids), torch.zeros_like(ids))
    shapes = {(int(k.shape[1]), int(k.shape[-1])) for k, _ in cache_layers(cache)}
    if len(shapes) != 1:
        raise ValueError(f"{lm.label}'s blocks keep caches of different shapes {sorted(shapes)}")
    return shapes.pop()


def last_hidden_after(lm: LM, cache: Any, attention_mask: torch.Tensor,
                      **inputs: torch.Tensor) -> torch.Tensor:
    """:meth:`LM.last_hidden` of a right-padded batch read after the tokens in ``cache``: they
    are attended to by every row and take the first positions, so the batch's tokens start at
    the cache's length (as if the cached tokens had come first)."""
    width = cache.get_seq_length()
    b, t = attention_mask.shape
    body_mask = torch.cat([attention_mask.new_ones(b, width), attention_mask], 1)
    pos = width + torch.arange(t, device=attention_mask.device)[None].expand(b, t)
    return lm.last_hidden(attention_mask, body_mask=body_mask, position_ids=pos, use_cache=True,
                          **{_cache_argument(type(lm.body)): cache}, **inputs)
