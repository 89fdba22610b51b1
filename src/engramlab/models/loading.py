"""``load_model``: one entry point for registry names, local folders, hub ids and GGUF files."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import EngramError, ModelLoadError, ModelNotFoundError
from .gguf import load_gguf
from .layout import Layout
from .lm import LM
from .placement import DeviceMap, check_device_map, dispatch
from .registry import DEFAULT_MODEL, REGISTRY, registry_entry

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """One quick TCP connect to the hub endpoint; no retries, so offline failure is immediate."""
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") or os.environ.get(
        "TRANSFORMERS_OFFLINE"
    ) in ("1", "true", "True"):
        return False
    try:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        host, port = endpoint.hostname, endpoint.port or 443
    except Exception:
        return False
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hf(source: str, dtype: torch.dtype, *, local_only: bool,
             device_map: DeviceMap | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # with peft installed, transformers also looks for an adapter config, and that lookup does
    # not inherit local_files_only: offline it would retry the network for ~20 s
    extra: dict = {"adapter_kwargs": {"local_files_only": True}} if local_only else {}
    if device_map is not None:  # weights go straight to their devices, never all on the host
        extra["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only,
                                                 **extra)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer for %s (%s); text helpers will be unavailable", source, exc)
        tokenizer = None
    return model, tokenizer


def _load_hub(hub_id: str, dtype: torch.dtype, asked: str, device_map: DeviceMap | None):
    try:  # the local Hugging Face cache first: works offline, no network round trip
        return _load_hf(hub_id, dtype, local_only=True, device_map=device_map)
    except (OSError, ValueError):
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"cannot load {asked!r}: hub id {hub_id!r} is not in the local Hugging Face cache and "
            "the hub is unreachable (offline). Download it on a connected machine "
            f"(huggingface-cli download {hub_id} --local-dir DIR) and pass the folder instead: "
            "load_model('DIR') / --model DIR"
        )
    return _load_hf(hub_id, dtype, local_only=False, device_map=device_map)


def _prepare_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        return
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    device_map: DeviceMap | None = None,
    progress: bool = True,
) -> LM:
    """Load a causal LM as an :class:`LM`.

    ``spec`` is a registry name (``engram models`` lists them; ``smollm2-135m`` is embedded), a
    local Hugging Face folder, a ``.gguf`` file (dequantized once, then cached as safetensors), or
    a hub id (local HF cache first; fails at once with a clear message when offline).
    ``dtype`` defaults to float32; in bfloat16 or float16 the weights and forward passes are
    half precision while statistics, edit solves and lens fits still accumulate and solve in
    float32/float64. ``device`` defaults to CUDA when available. ``device_map`` ("auto",
    "balanced", "sequential" or a ``{module: device}`` dict, as accelerate takes them) spreads
    the blocks over the devices present instead; it excludes ``device``.
    """
    torch_dtype = _resolve_dtype(dtype)
    if device_map is not None:
        if device is not None:
            raise ValueError("pass device or device_map, not both: a device map places every "
                             "module itself")
        check_device_map(device_map)
    target = _resolve_device(device)
    with _hf_progress(progress):
        model, tokenizer, folder, source = _load_any(spec, torch_dtype, progress, device_map)
    _prepare_tokenizer(tokenizer)
    if device_map is None:
        model = model.to(target)
    elif not hasattr(model, "hf_device_map"):  # GGUF: built on the host, then dispatched
        model = dispatch(model, device_map, torch_dtype)
    model.eval()
    model.requires_grad_(False)
    return LM(model=model, tokenizer=tokenizer, layout=Layout(model), name=str(spec),
              folder=folder, source=source)


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Let transformers draw its loading bars only when the caller wants progress."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _load_folder(path: Path, torch_dtype: torch.dtype, device_map: DeviceMap | None):
    """A local Hugging Face folder; missing or unreadable weights become one clear error."""
    if not any((path / name).is_file() for name in WEIGHT_FILES) and \
            not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"model folder {path} has a config.json but no weights "
                             f"({' / '.join(WEIGHT_FILES[::2])}); copy them there or point at "
                             "a complete folder")
    try:
        return _load_hf(str(path), torch_dtype, local_only=True, device_map=device_map)
    except EngramError:
        raise
    except Exception as exc:  # transformers / safetensors / torch raise many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model folder {path} could not be read ({reason}); its weights "
                             "may be truncated or corrupt: copy or save them again") from None


def _load_any(spec: str | os.PathLike[str], torch_dtype: torch.dtype, progress: bool,
              device_map: DeviceMap | None = None):
    asked = str(spec)
    folder: Path | None = None
    entry = registry_entry(asked)
    path = Path(os.path.expanduser(asked))

    if entry is not None and entry.embedded_package:
        model, tokenizer, folder = load_gguf(entry.embedded_path(), dtype=torch_dtype,
                                             announce=progress)
        source = str(entry.embedded_path())
    elif entry is not None and entry.hub_id:
        model, tokenizer = _load_hub(entry.hub_id, torch_dtype, asked, device_map)
        source = entry.hub_id
    elif path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        model, tokenizer, folder = load_gguf(path, dtype=torch_dtype, announce=progress)
        source = str(path)
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            model, tokenizer, folder = load_gguf(ggufs[0], dtype=torch_dtype, announce=progress)
            source = str(ggufs[0])
        elif not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"folder {path} is not a Hugging Face model (no config.json) and holds "
                f"{len(ggufs)} .gguf files; point at a model folder or at one .gguf file"
            )
        else:
            model, tokenizer = _load_folder(path, torch_dtype, device_map)
            folder, source = path, str(path)
    elif asked.startswith((".", "/", "~")) or asked.count("/") > 1:
        raise ModelNotFoundError(f"model folder {asked!r} does not exist")
    elif asked.count("/") == 1:
        model, tokenizer = _load_hub(asked, torch_dtype, asked, device_map)
        source = asked
    else:
        raise ModelNotFoundError(
            f"unknown model {asked!r}: not a registry name, a folder, a .gguf file or a hub id "
            f"(owner/name). Registry names: {', '.join(sorted(REGISTRY))}"
        )
    return model, tokenizer, folder, source
