"""Per-layer questions asked of ``[layers, tokens]`` boolean readings, answered in one place.

Early exit, learned exit policies, confidence heads and the depth analysis all ask one of two
things of a lens read at every layer: the first layer where something holds (where a token
exits), or the layer from which it holds at every deeper layer (where a prediction settles).
"""

from __future__ import annotations

import torch


def first_layer_where(hit: torch.Tensor) -> torch.Tensor:
    """Per token (column), the first layer (row) where ``hit`` holds; L where it never does."""
    n_layers = hit.shape[0]
    never = torch.full_like(hit[0], n_layers, dtype=torch.long)
    return torch.where(hit.any(0), hit.float().argmax(0).long(), never)


def settled_from(holds: torch.Tensor) -> torch.Tensor:
    """Per token, the shallowest layer from which ``holds`` is true at every deeper layer;
    L when it fails at the last layer (0 when it always holds)."""
    n_layers = holds.shape[0]
    miss = ~holds
    last_miss = n_layers - 1 - miss.flip(0).float().argmax(0).long()
    return torch.where(miss.any(0), last_miss + 1, torch.zeros_like(last_miss))
