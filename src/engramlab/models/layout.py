"""Architecture-neutral access to the parts of a causal LM that engramlab reads and writes.

Every other module asks a :class:`Layout` for "block 5", "the MLP value weight of layer 17" or
"the final norm" and never spells a Hugging Face attribute path itself. Architecture
differences — module names, and GPT-2's ``Conv1D`` which stores weights transposed — live here
and nowhere else.

Vocabulary used across the package (as in ROME/MEMIT): the MLP *keys* of layer ``i`` are the
input of the MLP's down ("value") projection, one ``d_mlp`` vector per token; the *value
weight* maps keys to the residual stream and is always presented as a ``[d_model, d_mlp]``
matrix whatever its storage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PointError, UnsupportedArchitectureError


@dataclass(frozen=True)
class LayoutSpec:
    """Attribute paths of one architecture family.

    ``blocks``, ``final_norm``, ``embed`` and ``unembed`` are paths from the model root;
    ``attn``, ``mlp`` and ``mlp_value`` are paths inside one block.
    """

    blocks: str
    attn: str
    mlp: str
    mlp_value: str
    final_norm: str
    embed: str
    unembed: str = "lm_head"


_LLAMA_LIKE = LayoutSpec(
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    mlp_value="mlp.down_proj",
    final_norm="model.norm",
    embed="model.embed_tokens",
)

_GPT2_LIKE = LayoutSpec(
    blocks="transformer.h",
    attn="attn",
    mlp="mlp",
    mlp_value="mlp.c_proj",
    final_norm="transformer.ln_f",
    embed="transformer.wte",
)

_LAYOUTS: dict[str, LayoutSpec] = {
    "gpt2": _GPT2_LIKE,
    "gpt_neo": _GPT2_LIKE,
    "gptj": dataclasses.replace(_GPT2_LIKE, mlp_value="mlp.fc_out"),
    "gpt_neox": LayoutSpec(
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        mlp_value="mlp.dense_4h_to_h",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        unembed="embed_out",
    ),
    **{
        name: _LLAMA_LIKE
        for name in (
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "phi3",
        )
    },
}


def register_layout(model_type: str, spec: LayoutSpec) -> None:
    """Teach engramlab a new architecture (``config.model_type``) without editing the package."""
    _LAYOUTS[model_type] = spec


def supported_architectures() -> list[str]:
    return sorted(_LAYOUTS)


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            # GPT-NeoX checkpoints differ on the unembedding's name across versions.
            raise AttributeError(part)
        module = getattr(module, part)
    return module


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D stores ``weight`` as ``[in, out]``: decided by type, never by shape."""
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Linear)


class Layout:
    """A model's parts, resolved once, addressed by layer index."""

    def __init__(self, model: nn.Module, spec: LayoutSpec | None = None) -> None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if spec is None:
            if model_type not in _LAYOUTS:
                raise UnsupportedArchitectureError(
                    f"unknown model layout {model_type!r} ({type(model).__name__}); supported: "
                    f"{', '.join(supported_architectures())}. Register one with "
                    "engramlab.models.register_layout(model_type, LayoutSpec(blocks=..., attn=..., "
                    "mlp=..., mlp_value=..., final_norm=..., embed=..., unembed=...))"
                )
            spec = _LAYOUTS[model_type]
        self.spec = spec
        self.model_type = model_type
        self._model = model
        try:
            self.blocks: nn.ModuleList = _get(model, spec.blocks)  # type: ignore[assignment]
            self.final_norm = _get(model, spec.final_norm)
            self.embed = _get(model, spec.embed)
            self.unembed = self._find_unembed(model, spec.unembed)
            first = self.blocks[0]
            _get(first, spec.attn)
            _get(first, spec.mlp)
            _get(first, spec.mlp_value)
        except (AttributeError, IndexError) as exc:
            raise UnsupportedArchitectureError(
                f"model {type(model).__name__} (model_type {model_type!r}) does not match its "
                f"layout: attribute {exc} is missing. Register a corrected LayoutSpec with "
                "engramlab.models.register_layout()"
            ) from exc
        names = {id(m): n for n, m in model.named_modules()}
        self._module_names = names

    @staticmethod
    def _find_unembed(model: nn.Module, path: str) -> nn.Module:
        try:
            return _get(model, path)
        except AttributeError:
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            if out is None:
                raise
            return out

    # sizes -----------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.value_weight(0).shape[0]

    @property
    def d_mlp(self) -> int:
        return self.value_weight(0).shape[1]

    def check_layer(self, layer: int) -> int:
        """Return ``layer`` (negative counts from the end) or raise a clear range error."""
        n = self.n_layers
        if not isinstance(layer, int) or not -n <= layer < n:
            raise PointError(
                f"layer {layer} out of range: this model has {n} layers (0..{n - 1}); "
                "negative indices count from the last layer"
            )
        return layer % n

    # modules ---------------------------------------------------------------------------
    @contextmanager
    def blocks_from(self, layer: int) -> Iterator[None]:
        """Inside the block, the model's forward runs only blocks ``layer``, ``layer + 1``, …:
        its block list is cut to that tail (every block keeps its index here and its hooks).
        Block ``layer`` still receives the embeddings; whoever starts there replaces them with
        the state it should see (:func:`engramlab.trace.run_model`'s ``start``)."""
        layer = self.check_layer(layer)
        parent_path, _, name = self.spec.blocks.rpartition(".")
        parent = _get(self._model, parent_path) if parent_path else self._model
        full = getattr(parent, name)
        # models with mixed attention (Gemma 2/3, Qwen2 with sliding layers) look a block's mask
        # and rotary table up by its position in the loop, so the list of types is cut alike
        config = getattr(self._model, "config", None)
        types = getattr(config, "layer_types", None)
        cut_types = isinstance(types, list) and len(types) == len(full)
        setattr(parent, name, nn.ModuleList(list(full)[layer:]))
        if cut_types:
            config.layer_types = types[layer:]
        try:
            yield
        finally:
            setattr(parent, name, full)
            if cut_types:
                config.layer_types = types

    def block(self, layer: int) -> nn.Module:
        return self.blocks[self.check_layer(layer)]

    def device_of(self, layer: int) -> torch.device:
        """Where block ``layer`` computes: accelerate's execution device when the model is
        dispatched (an offloaded block's weights are ``meta``), else its weights' device."""
        block = self.block(layer)
        hook = getattr(block, "_hf_hook", None)
        where = getattr(hook, "execution_device", None)
        if where is not None:
            return torch.device(where)
        return next(block.parameters()).device

    def attn(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.spec.attn)

    def mlp(self, layer: int) -> nn.Module:
        return _get(self.block(layer), self.spec.mlp)

    def value_module(self, layer: int) -> nn.Module:
        """The MLP down projection: its input are the keys, its weight the value vectors."""
        return _get(self.block(layer), self.spec.mlp_value)

    def module_name(self, module: nn.Module) -> str:
        return self._module_names[id(module)]

    # value weights ---------------------------------------------------------------------
    def value_is_transposed(self, layer: int) -> bool:
        return _is_conv1d(self.value_module(layer))

    def value_param_name(self, layer: int) -> str:
        """Name of the value weight in ``model.named_parameters()`` (what deltas key on)."""
        return f"{self.module_name(self.value_module(layer))}.weight"

    def value_weight(self, layer: int) -> torch.Tensor:
        """The value weight as a ``[d_model, d_mlp]`` view sharing storage with the model."""
        module = self.value_module(layer)
        weight: torch.Tensor = module.weight  # type: ignore[assignment]
        return weight.T if _is_conv1d(module) else weight

    def to_storage(self, layer: int, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Map low-rank factors of a ``[d_model, d_mlp]`` change ``u @ v.T`` to storage order."""
        return (v, u) if self.value_is_transposed(layer) else (u, v)

    def dense_to_storage(self, layer: int, delta: torch.Tensor) -> torch.Tensor:
        return delta.T if self.value_is_transposed(layer) else delta
