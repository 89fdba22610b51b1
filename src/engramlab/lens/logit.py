"""The logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): read any layer's
residual state with the model's own final norm and unembedding, no training, no parameters."""

from __future__ import annotations

import torch

from .base import Lens


class LogitLens(Lens):
    kind = "logit"

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        return hidden
