"""The ``LM`` wrapper: a model, its tokenizer and its :class:`Layout`, with the few operations
every capability needs (tokenise with masks, read logits from any hidden state, fingerprint the
weights, save atomically)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._io import atomic_dir
from .layout import Layout

# Samples per tensor folded into the fingerprint besides the tensor's float64 sum.
_FINGERPRINT_SAMPLES = 1024
_FINGERPRINT_SLICE = 1 << 20  # elements per partial sum (8 MB as float64)
# Config entries that describe how a model was loaded or named, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path", "_model_name_or_path", "transformers_version", "quantization_config",
    "architectures", "dtype", "torch_dtype", "use_cache", "return_dict", "output_attentions",
    "output_hidden_states", "_attn_implementation", "_attn_implementation_autoset",
}
# End-of-turn markers of the chat templates (ChatML, Llama 3, Gemma, Phi-3).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


@dataclass
class LM:
    """A causal LM ready for reading and editing.

    ``name`` is how the user asked for it (registry name, folder or hub id); ``folder`` is a local
    Hugging Face folder holding its weights when there is one (the GGUF cache, or the user's).
    """

    model: nn.Module
    tokenizer: Any
    layout: Layout
    name: str = "model"
    folder: Path | None = None
    source: str | None = None
    _delta_counter: int = field(default=0, repr=False)
    _fp_cache: tuple[Any, str] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """A short name for titles and tables: the registry name or hub id as given, or the
        last part of a local path (never a whole path)."""
        path = Path(self.name).expanduser()
        return path.resolve().name if path.exists() else self.name

    @property
    def body(self) -> nn.Module:
        """The transformer without its language-modelling head: passes that only need hidden
        states run this and skip the unembedding of every position."""
        return getattr(self.model, "base_model", self.model)

    # sizes and placement ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.layout.n_layers

    @property
    def d_model(self) -> int:
        return self.layout.d_model

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding (may exceed the tokenizer's size: padded vocabularies)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def d_mlp(self) -> int:
        return self.layout.d_mlp

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self) -> Any:
        return self.model.config

    # text ---------------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded batch on the model's device; ``attention_mask`` marks real tokens.

        Right padding keeps token positions identical to the unpadded prompt, so positions found
        on one prompt (e.g. the last subject token) index the batch directly.
        """
        if isinstance(texts, str):
            texts = [texts]
        if self.tokenizer is None:
            raise ValueError("this LM has no tokenizer; pass token ids to the model directly")
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        keep = ("input_ids", "attention_mask")
        return {k: v.to(self.device) for k, v in enc.items() if k in keep}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model sees it inside a prompt (no special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: int | Sequence[int]) -> str:
        return str(self.tokenizer.decode([ids] if isinstance(ids, int) else list(ids)))

    # reading ------------------------------------------------------------------------------
    @property
    def unembedding_is_linear(self) -> bool:
        """Whether logits are a bias-free linear map of the final-normed state (no logit
        soft-cap), so statistics of the unembedding rows stand for the logits."""
        return getattr(self.layout.unembed, "bias", None) is None and \
            not getattr(self.config, "final_logit_softcapping", None)

    def logits_from_hidden(self, hidden: torch.Tensor,
                           tokens: Sequence[int] | None = None) -> torch.Tensor:
        """Final norm + unembedding (+ Gemma-2's logit soft-cap): the logit lens of any state.
        With ``tokens``, only those tokens' logits, in that order (only their rows are read)."""
        normed = self.layout.final_norm(hidden)
        if tokens is None:
            logits = self.layout.unembed(normed)
        else:
            weight = self.layout.unembed.weight
            index = torch.tensor(list(tokens), device=weight.device)
            bias = getattr(self.layout.unembed, "bias", None)
            logits = F.linear(normed.to(weight.device), weight[index],
                              None if bias is None else bias[index])
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.to(hidden.device)

    def last_hidden(self, attention_mask: torch.Tensor, *, body_mask: torch.Tensor | None = None,
                    **inputs: Any) -> torch.Tensor:
        """``[batch, d_model]``: the last block's output at each row's last real token of a
        right-padded batch (``input_ids`` or ``inputs_embeds``), from one forward of the body;
        differentiable in the inputs. ``body_mask`` is the mask the body sees when it differs
        from the new tokens' (a key/value cache in front of them: see ``kv.last_hidden_after``);
        other ``inputs`` go to the body as they are."""
        kept: dict[str, torch.Tensor] = {}

        def keep(_m: nn.Module, _a: Any, out: Any) -> None:
            kept["h"] = out[0] if isinstance(out, tuple) else out

        handle = self.layout.block(self.n_layers - 1).register_forward_hook(keep)
        try:
            self.body(attention_mask=attention_mask if body_mask is None else body_mask,
                      **{"use_cache": False, **inputs})
        finally:
            handle.remove()
        last = attention_mask.sum(1) - 1
        h = kept["h"].to(last.device)
        return h[torch.arange(last.shape[0], device=last.device), last]

    @torch.no_grad()
    def next_token_logits(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """``[batch, vocab]`` logits after the last real token of each prompt (one forward of
        the body; the unembedding only at those positions, not at every padded one)."""
        enc = self.tokenize(prompts)
        hidden = self.last_hidden(enc["attention_mask"], input_ids=enc["input_ids"])
        return self.logits_from_hidden(hidden).float()

    def top_tokens(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        probs = self.next_token_logits(prompt)[0].softmax(-1)
        top = probs.topk(k)
        pairs = zip(top.values, top.indices, strict=True)
        return [(self.decode(int(i)), float(p)) for p, i in pairs]

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 20) -> list[str]:
        """Greedy continuations (the deterministic view used by fluency metrics and demos)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        self.tokenizer.padding_side = "right"
        out = self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.end_token_ids(),
        )
        return [self.tokenizer.decode(row[enc["input_ids"].shape[1] :].tolist(),
                                      skip_special_tokens=True) for row in out]

    def end_token_ids(self) -> list[int]:
        """Tokens that end a generation: EOS and the chat templates' end-of-turn markers (an
        instruct model answers a plain prompt and then closes its turn)."""
        vocab = self.tokenizer.get_vocab()
        ids = [vocab[t] for t in END_OF_TURN if t in vocab]
        eos = self.tokenizer.eos_token_id
        return list(dict.fromkeys([*([eos] if eos is not None else []), *ids]))

    @contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """The weights without gradients inside the block (when only something outside them is
        trained: an edit's δ, a lens), each restored to what it was after it, also on an
        error."""
        params = list(self.model.parameters())
        before = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, g in zip(params, before, strict=True):
                p.requires_grad_(g)

    # identity -----------------------------------------------------------------------------
    def _config_json(self) -> str:
        cfg = self.config.to_dict()
        return json.dumps({k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS},
                          sort_keys=True, default=str)

    def signature(self) -> str:
        """Hash of the architecture (config, parameter names and shapes), not of the values."""
        h = hashlib.sha256(self._config_json().encode())
        for name, p in self.model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)};".encode())
        return h.hexdigest()[:16]

    def fingerprint(self) -> str:
        """Stable hash of the weights that changes whenever a weight changes.

        Hashing every byte of a 6 GB model on each call is too slow, so each tensor contributes its
        shape, dtype, float64 sum and 1,024 strided samples. The result is memoised on the
        parameters' storage pointers and autograd version counters (bumped by every in-place update,
        including optimiser steps and our deltas) plus a counter that deltas bump explicitly.
        Call :meth:`invalidate_fingerprint` after writing through ``param.data`` by hand.
        """
        known = self.known_fingerprint()
        if known is not None:
            return known
        key = self.weights_version()
        params = list(self.model.named_parameters())
        h = hashlib.sha256(self._config_json().encode())
        with torch.no_grad():
            for name, p in params:
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // _FINGERPRINT_SAMPLES)
                sample = flat[::step][:_FINGERPRINT_SAMPLES].float().cpu().numpy().tobytes()
                # summed in slices: a float64 sum of a whole tensor first makes a float64
                # copy of it (226 MB for SmolLM2's embedding, the largest transient of an edit)
                total = sum(float(torch.sum(part, dtype=torch.float64))
                            for part in flat.split(_FINGERPRINT_SLICE))
                h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{total!r};".encode())
                h.update(sample)
        digest = h.hexdigest()[:16]
        self._fp_cache = (key, digest)
        return digest

    def invalidate_fingerprint(self) -> None:
        self._delta_counter += 1

    def weights_version(self) -> tuple:
        """A cheap token that changes whenever a weight may have changed (the parameters'
        storage and version counters, and the deltas' counter); equal tokens: same weights."""
        return (self._delta_counter,
                tuple((p.data_ptr(), p._version) for p in self.model.parameters()))

    def known_fingerprint(self) -> str | None:
        """The fingerprint of the current weights if it is already known (no hashing)."""
        if self._fp_cache is not None and self._fp_cache[0] == self.weights_version():
            return self._fp_cache[1]
        return None

    def restore_fingerprint(self, digest: str) -> None:
        """Declare that the weights are, bit for bit, those whose fingerprint was ``digest``
        (a delta reverted from its backup), so it is not hashed again."""
        self._fp_cache = (self.weights_version(), digest)

    # saving -------------------------------------------------------------------------------
    def save(self, out: str | os.PathLike[str], *, overwrite: bool = False,
             extra: dict[str, str] | None = None) -> Path:
        """Write a plain Hugging Face folder atomically; never over the folder it came from.
        ``extra`` maps file names to text written into the same folder (a run's record).

        Models loaded from GGUF are rebuilt from config + state dict (tensors shared) because
        ``transformers`` refuses to save a model that still carries a GGUF quantization config.
        """
        from .gguf import rebuild_plain

        out = Path(out)
        if self.folder is not None and out.resolve() == Path(self.folder).resolve():
            raise FileExistsError(
                f"refusing to overwrite the source model folder {out}; choose another --out"
            )
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; choose another path or "
                                  "allow replacing it (--overwrite, overwrite=True)")
        model = self.model
        if getattr(model.config, "quantization_config", None) is not None:
            model = rebuild_plain(model)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            for name, text in (extra or {}).items():
                (Path(tmp) / name).write_text(text)
        return out
