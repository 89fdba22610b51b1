"""Models spread over several devices, through accelerate's dispatch.

A dispatched model keeps each block on its own device and moves activations between them in
accelerate's hooks; the rest of engramlab reads its inputs' device from :attr:`LM.device` (the
embedding's) and moves what it adds into the stream to the device of the tensor it meets.

accelerate *offloads* modules that a map puts on ``"cpu"`` or ``"disk"`` while a GPU is the
main device: their parameters become ``meta`` tensors, streamed in for each forward. Reading
and statistics still work there, but a weight edit needs resident weights, so
:func:`offloaded_parameters` lets :class:`~engramlab.delta.WeightDelta` refuse with the fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DeviceMap = str | dict[str, Any]

AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: DeviceMap) -> None:
    """Reject a device map before anything is loaded."""
    if isinstance(device_map, str):
        if device_map not in AUTO_MAPS:
            raise ValueError(f"unknown device_map {device_map!r}; use one of "
                             f"{', '.join(AUTO_MAPS)} or a {{module name: device}} dict")
    elif not isinstance(device_map, dict) or not device_map:
        raise ValueError("device_map must be 'auto' (or another accelerate strategy) or a "
                         "non-empty {module name: device} dict")


def dispatch(model: nn.Module, device_map: DeviceMap, dtype: torch.dtype) -> nn.Module:
    """Place an already-built model's modules per ``device_map`` (a strategy name is planned
    by accelerate over the devices present, blocks never split)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    check_device_map(device_map)
    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        memory = None
        if device_map != "sequential":
            memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, dtype=dtype,
                                           no_split_module_classes=no_split)
    devices = {str(d) for d in device_map.values()}
    # a map of plain devices only (no GPU to stream to) executes each module where it lies
    main = "cpu" if devices <= {"cpu"} else None
    model = dispatch_model(model, device_map=device_map, main_device=main)
    return model


def offloaded_parameters(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Names of parameters that accelerate has offloaded (held as ``meta`` tensors)."""
    params = dict(model.named_parameters())
    return [n for n in (names if names is not None else list(params)) if params[n].is_meta]
