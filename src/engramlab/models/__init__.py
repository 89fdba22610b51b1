"""Models: loading, the :class:`LM` wrapper, architecture layouts and the embedded registry."""

from .layout import Layout, LayoutSpec, register_layout, supported_architectures
from .lm import LM
from .loading import load_model
from .registry import DEFAULT_MODEL, REGISTRY, RegistryEntry

__all__ = [
    "DEFAULT_MODEL",
    "LM",
    "REGISTRY",
    "Layout",
    "LayoutSpec",
    "RegistryEntry",
    "load_model",
    "register_layout",
    "supported_architectures",
]
