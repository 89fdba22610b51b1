"""What every lens shares: read a layer's residual state as next-token logits, save, load.

A lens is a set of per-layer translators ``h ↦ h'`` into the space of the last block's output;
the model's own final norm and unembedding (``LM.logits_from_hidden``) then give logits, so no
lens ever copies the unembedding. Files are safetensors (the translators) + JSON (kind, model
signature and fingerprint, settings). A lens refuses a model of another architecture; on the
same architecture with other weights (an edited model, a fine-tune) it warns and works — reading
an edited model through the original model's lens is a legitimate question.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._io import atomic_dir
from ..errors import DeltaMismatchError
from ..models.lm import LM

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: low-rank shortcuts and the one jump add to the identity


class Lens(nn.Module):
    """Base class: subclasses implement :meth:`translate` and list their settings in ``config``."""

    kind: ClassVar[str] = "lens"
    registry: ClassVar[dict[str, type[Lens]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Lens.registry[cls.kind] = cls

    def __init__(self, lm: LM, **config: Any) -> None:
        super().__init__()
        self.n_layers = lm.n_layers
        self.d_model = lm.d_model
        self.signature = lm.signature()
        self.fingerprint = lm.fingerprint()
        self.config = dict(config)

    # reading -----------------------------------------------------------------------------
    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Map a state entering block ``layer`` to the last block's output space."""
        raise NotImplementedError

    def predict(self, lm: LM, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Next-token logits read from ``hidden`` (states entering block ``layer``)."""
        self.check_layer(layer)
        return lm.logits_from_hidden(self.translate(hidden, layer))

    def check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"lens layer {layer} out of range: this lens reads layers "
                             f"0..{self.n_layers - 1} (the inputs of the model's blocks)")

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = True) -> Path:
        """Write ``path/`` (``lens.safetensors`` + ``lens.json``) atomically."""
        meta = {"format": FORMAT_VERSION, "kind": self.kind, "n_layers": self.n_layers,
                "d_model": self.d_model, "signature": self.signature,
                "fingerprint": self.fingerprint, "config": self.config}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            if tensors:
                save_file(tensors, str(tmp / "lens.safetensors"))
            (tmp / "lens.json").write_text(json.dumps(meta, indent=1))
        return Path(path)

    @staticmethod
    def load(path: str | os.PathLike[str], lm: LM, *, strict: bool = False) -> Lens:
        """Read a saved lens for ``lm``; ``strict`` also refuses other weights of the same model."""
        path = Path(path)
        meta_path = path / "lens.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a saved lens (no lens.json); train one with "
                                    "`engram lens train`")
        try:
            meta = json.loads(meta_path.read_text())
            cls = Lens.registry[meta["kind"]]
        except (ValueError, KeyError) as exc:
            raise DeltaMismatchError(f"{meta_path} is corrupt or of an unknown kind ({exc}); "
                                     "retrain the lens") from exc
        if meta.get("format") != FORMAT_VERSION:
            raise DeltaMismatchError(f"lens {path} has format {meta.get('format')}; this "
                                     f"engramlab reads format {FORMAT_VERSION}: retrain it")
        if meta["signature"] != lm.signature():
            raise DeltaMismatchError(
                f"lens {path} was trained for another model architecture (signature "
                f"{meta['signature']}, this model {lm.signature()}); train a lens for this model")
        if meta["fingerprint"] != lm.fingerprint():
            msg = (f"lens {path} was trained on other weights of this architecture "
                   f"({meta['fingerprint']} vs {lm.fingerprint()})")
            if strict:
                raise DeltaMismatchError(msg)
            log.warning("%s; reading anyway", msg)
        lens = cls(lm, **meta["config"])
        lens.fingerprint = meta["fingerprint"]
        tensor_file = path / "lens.safetensors"
        if tensor_file.is_file():
            lens.load_state_dict(load_file(str(tensor_file)))
        return lens.to(lm.device)
