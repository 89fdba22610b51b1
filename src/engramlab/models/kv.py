"""Key/value caches across transformers versions: running a prefix into a cache, continuing
from it, and reaching the tensors inside. Everything that differs between versions is here."""

from __future__ import annotations

import functools
import inspect
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
