"""A TopK sparse dictionary: the autoencoder behind the MLP-output SAEs (:mod:`.sae`).

Each training vector is scaled to unit norm first, so that the dictionary learns directions,
not the scale of the activations.

The model is a TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse
autoencoders"): ``codes = TopK(ReLU(W_enc x + b))``, ``x̂ = codes @ D`` with unit-norm decoder
rows, the decoder initialised from random data vectors (fewer dead features) and the encoder
from its transpose. TopK fixes the sparsity exactly, so no L1 coefficient needs tuning.

A dictionary saved to the cache carries its key (the model fingerprint, the layer, the text and
the training settings): using it with another model (or after the weights changed) is refused
with a clear error instead of silently producing nonsense.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._io import atomic_file
from ..errors import CacheError, ConceptError
from ..models.lm import LM

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class TopKDictionary:
    """Decoder directions ``[n_features, d_model]`` (unit rows) and their TopK encoder."""

    decoder: torch.Tensor
    encoder: torch.Tensor  # [d_model, n_features]
    bias: torch.Tensor  # [n_features]
    k: int
    key: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return self.decoder.shape[0]

    @property
    def layers(self) -> list[int]:
        return list(self.key.get("layers", []))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(x @ self.encoder + self.bias)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, top.indices, top.values)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.decoder

    def check_model(self, lm: LM) -> None:
        """Refuse a dictionary trained for other weights: its directions would mean nothing."""
        mine = self.key.get("model")
        if mine != lm.fingerprint():
            raise ConceptError(
                f"this dictionary was trained for model {mine}, not for the loaded model "
                f"{lm.fingerprint()}: train one for this model or load the "
                "model it was trained on")
        if self.decoder.shape[1] != lm.layout.d_model:
            raise ConceptError(f"dictionary width {self.decoder.shape[1]} does not match the "
                               f"model's d_model {lm.layout.d_model}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        meta = {"format": str(FORMAT_VERSION), "k": str(self.k),
                "key": json.dumps(self.key, sort_keys=True)}
        tensors = {"decoder": self.decoder.contiguous().cpu(),
                   "encoder": self.encoder.contiguous().cpu(), "bias": self.bias.contiguous().cpu()}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             expect: dict[str, Any] | None = None) -> TopKDictionary:
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = {name: f.get_tensor(name) for name in ("decoder", "encoder", "bias")}
        except Exception as exc:  # any failure means the file is unusable
            raise CacheError(f"dictionary file {path} is unreadable ({exc}); delete it to "
                             "retrain") from exc
        if meta.get("format") != str(FORMAT_VERSION):
            raise CacheError(f"dictionary file {path} has format {meta.get('format')}, "
                             f"expected {FORMAT_VERSION}")
        key = json.loads(meta.get("key", "{}"))
        if expect is not None and key != expect:
            diff = {k: (key.get(k), v) for k, v in expect.items() if key.get(k) != v}
            raise CacheError(f"dictionary file {path} was trained under another key: {diff}")
        d, e, b = t["decoder"], t["encoder"], t["bias"]
        if e.shape != (d.shape[1], d.shape[0]) or b.shape != (d.shape[0],):
            raise CacheError(f"dictionary file {path} has inconsistent shapes "
                             f"{tuple(d.shape)}, {tuple(e.shape)}, {tuple(b.shape)}")
        return cls(d, e, b, int(meta["k"]), key)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def fit_dictionary(data: torch.Tensor, *, n_features: int = 4096, k: int = 8,
                   steps: int = 1000, batch_size: int = 1024, lr: float = 1e-3,
                   seed: int = 0, progress: bool = True) -> TopKDictionary:
    """Train a TopK sparse autoencoder on the rows of ``data`` (each scaled to unit norm)."""
    if data.ndim != 2 or data.shape[0] < 2:
        raise ConceptError(f"need a [n, d] matrix of vectors to train on, got {tuple(data.shape)}")
    if not 0 < k <= n_features:
        raise ConceptError(f"k={k} must lie in 1..n_features={n_features}")
    gen = torch.Generator().manual_seed(seed)
    x = unit_rows(data.float())
    init = torch.randint(0, x.shape[0], (n_features,), generator=gen)
    decoder = torch.nn.Parameter(unit_rows(x[init] + 0.01 * torch.randn(n_features, x.shape[1],
                                                                   generator=gen)))
    encoder = torch.nn.Parameter(decoder.detach().T.clone())
    bias = torch.nn.Parameter(torch.zeros(n_features))
    opt = torch.optim.Adam([decoder, encoder, bias], lr=lr)
    bar = tqdm(range(steps), desc="dictionary", disable=not progress, leave=False)
    for _step in bar:
        rows = x[torch.randint(0, x.shape[0], (batch_size,), generator=gen)]
        with torch.no_grad():  # which k features fire: one dense product, no graph
            idx = (rows @ encoder + bias).topk(k, dim=-1).indices  # [b, k]
        # the chosen pre-activations again, with gradients only into the k encoder columns
        # and decoder rows each row uses: sparse work instead of three dense products
        vals = torch.relu(torch.einsum("bd,bkd->bk", rows, encoder.T[idx]) + bias[idx])
        recon = torch.einsum("bk,bkd->bd", vals, decoder[idx])
        loss = ((recon - rows) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            decoder.data = unit_rows(decoder.data)
        if _step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    d = TopKDictionary(decoder.detach().clone(), encoder.detach().clone(),
                        bias.detach().clone(), k)
    log.info("dictionary: %d features, k=%d, explained %.3f", n_features, k,
             explained_variance(d, x))
    return d


@torch.no_grad()
def explained_variance(d: TopKDictionary, x: torch.Tensor) -> float:
    """Share of the (unit-normed) vectors' squared norm the dictionary reconstructs."""
    x = unit_rows(x.float())
    err = 0.0
    for s in range(0, x.shape[0], 4096):
        rows = x[s:s + 4096]
        err += float(((d.decode(d.encode(rows)) - rows) ** 2).sum())
    return 1.0 - err / float((x ** 2).sum())
