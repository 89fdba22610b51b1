"""A LoRA adapter folder saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``)
read back as a :class:`~engramlab.WeightDelta`, without wrapping the model: each adapted
module's change is ``scaling · B A`` (``scaling = lora_alpha / r``, or ``/ √r`` with rsLoRA),
kept as low-rank factors. So an adapter trained anywhere can be applied, reverted, saved and
compared with an edit like any other delta. DoRA adapters rescale whole columns and cannot be
written as ``B A``; they are refused (a DoRA fine-tune made here returns its dense delta)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..delta import ParamDelta, WeightDelta
from ..errors import InputError
from ..models.lm import LM

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def read_adapter_folder(folder: str | os.PathLike[str], what: str = "PEFT adapter",
                        hint: str = "") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT folder's config and tensors, or a one-line error naming the folder (``what`` it
    should hold, ``hint`` on how one is made)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise InputError(f"{folder} is not a saved {what} (expected {CONFIG} and "
                         f"{WEIGHTS}{hint})")
    try:
        return json.loads((folder / CONFIG).read_text()), load_file(str(folder / WEIGHTS))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"{folder} holds an unreadable {what} ({e})") from None


def load_adapter(folder: str | os.PathLike[str], lm: LM) -> WeightDelta:
    """The change a saved LoRA adapter makes to ``lm``'s weights."""
    folder = Path(folder)
    config, tensors = read_adapter_folder(folder)
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise InputError(f"{folder} is not a plain LoRA adapter (DoRA and other PEFT methods "
                         "are not B·A updates); apply it with peft instead")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    params = dict(lm.model.named_parameters())
    entries: dict[str, ParamDelta] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.removeprefix(PREFIX).split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        name = f"{module}.weight"
        if b is None or name not in params:
            raise InputError(f"{folder} was made for another model: it adapts {module!r}, "
                             f"which {lm.label} does not have")
        a, b = a.float(), b.float() * scaling  # A: [r, in], B: [out, r]
        want = params[name].shape
        if config.get("fan_in_fan_out"):  # GPT-2's Conv1D keeps Wᵀ: ΔWᵀ = Aᵀ Bᵀ
            entry = ParamDelta(u=a.T.contiguous(), v=b.contiguous())
        else:
            entry = ParamDelta(u=b.contiguous(), v=a.T.contiguous())
        if tuple(entry.shape) != tuple(want):
            raise InputError(f"{folder} was made for another model: its update of {name} is "
                             f"{tuple(entry.shape)}, the weight here is {tuple(want)}")
        entries[name] = entry
    if not entries:
        raise InputError(f"{folder} holds no LoRA weights")
    return WeightDelta.for_model(lm, entries, method="lora-adapter", source=str(folder),
                                 rank=r)
