"""Prompts an editor works on: context templates, subject token positions, padded batches.

ROME (Meng et al. 2022, §3.1) and MEMIT (Meng et al. 2023, §4.2) average keys and optimise
target values over the edit prompt prefixed by short texts the model wrote itself, so the edit
holds in varied contexts. We generate those templates the same way (top-k 5 sampling from the
starters "The", "Therefore", "Because", "I", "You"), but seeded and cached per model fingerprint
instead of in a module-level global, so two runs on the same weights see the same templates.

The subject's tokens are found from the tokenizer's character offsets at the place the ``{}``
placeholder was filled, not by searching the subject string again: a subject that occurs twice,
or that tokenises differently inside the prompt than alone, is still located correctly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_file, keyed_path, read_cached
from ..errors import CacheError, RequestError
from ..models.lm import LM

STARTERS = ("The", "Therefore", "Because", "I", "You")
SUBJECT_POSITIONS = ("last", "first", "all", "prompt_last")


# context templates ------------------------------------------------------------------------
def context_templates(lm: LM, spec: Sequence[Sequence[int]] = ((10, 5),), *, seed: int = 0,
                      use_cache: bool = True) -> list[str]:
    """``["{}"]`` plus, for each ``(length, n)`` in ``spec``, ``n`` model-written prefixes of
    ``length`` tokens (starter included) ending in ``". {}"``.

    MEMIT's setting is ``((10, 5),)`` (6 templates); ROME's paper code used ``((5, 10), (10, 10))``.
    """
    spec = [(int(length), int(n)) for length, n in spec]
    path = keyed_path("templates", "templates", [lm.fingerprint(), spec, seed, STARTERS],
                      ".json")
    found = read_cached(path, _load_templates) if use_cache else None
    if found is not None:
        return found
    templates = ["{}"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for length, n in spec:
        starters = [STARTERS[i % len(STARTERS)] for i in range(n)]
        texts = _sample(lm, starters, length, gen)
        templates += [t.replace("{", " ").replace("}", " ") + ". {}" for t in texts]
    if use_cache:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({"model": lm.name, "spec": spec, "templates": templates}))
    return templates


def _load_templates(path: Path) -> list[str]:
    try:
        loaded = json.loads(path.read_text())["templates"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"template cache {path} is corrupt ({exc})") from None
    if not all(isinstance(t, str) and t.count("{}") == 1 for t in loaded):
        raise CacheError(f"template cache {path} holds a template without one {{}}")
    return list(loaded)


@torch.no_grad()
def _sample(lm: LM, starters: list[str], length: int, gen: torch.Generator) -> list[str]:
    """Top-k (5) samples of ``length`` tokens in total, starter included (as the papers)."""
    tok = lm.tokenizer
    rows = [lm.encode(s) for s in starters]
    new = max(1, length - max(len(r) for r in rows))
    cuda = [lm.device.index or 0] if lm.device.type == "cuda" else []
    tok.padding_side = "left"
    enc = tok(starters, return_tensors="pt", padding=True, add_special_tokens=True).to(lm.device)
    tok.padding_side = "right"
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
        out = lm.model.generate(**enc, do_sample=True, top_k=5, top_p=1.0, temperature=1.0,
                                max_new_tokens=new, pad_token_id=tok.pad_token_id)
    texts = []
    for starter, row in zip(starters, out, strict=True):
        cont = tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
        texts.append((starter + cont).replace("\n", " ").strip())
    return texts


# token positions --------------------------------------------------------------------------
@dataclass
class Encoded:
    """One tokenised prompt: ids (special tokens included) and the subject's token indices."""

    text: str
    ids: list[int]
    subject: list[int]


def encode_with_subject(lm: LM, template: str, prompt: str, subject: str,
                        case_id: object = None) -> Encoded:
    """Tokenise ``template`` (containing ``{}``) filled with ``prompt`` and its ``subject``."""
    prefix, _, suffix = template.partition("{}")
    before, _, after = prompt.partition("{}")
    text = prefix + before + subject + after + suffix
    start = len(prefix) + len(before)
    end = start + len(subject)
    enc = lm.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc.get("offset_mapping")
    if offsets is None:  # slow tokenizer: count the tokens of the text before/through the subject
        n_before = len(lm.tokenizer(text[:start].rstrip(), add_special_tokens=True)["input_ids"])
        n_through = len(lm.tokenizer(text[:end], add_special_tokens=True)["input_ids"])
        positions = list(range(n_before, n_through))
    else:
        positions = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not positions:
        where = f" (case {case_id})" if case_id is not None else ""
        raise RequestError(
            f"subject {subject!r} not found among the tokens of prompt {text!r}{where} — "
            "check the spelling or choose subject_pos='prompt_last'")
    return Encoded(text, ids, positions)


def pick_positions(enc: Encoded, how: str) -> list[int]:
    """The token(s) where a fact is looked up: the last subject token by default (ROME §2)."""
    if how == "last":
        return [enc.subject[-1]]
    if how == "first":
        return [enc.subject[0]]
    if how == "all":
        return list(enc.subject)
    if how == "prompt_last":
        return [len(enc.ids) - 1]
    raise RequestError(f"unknown subject position {how!r}; use one of {SUBJECT_POSITIONS}")
