"""Generation fluency: the weighted bi-/tri-gram entropy of ROME (Meng et al. 2022, §4.2).

A model that repeats itself after an edit ("Paris Paris Paris …") has low n-gram entropy.
Per text: ``mean(2/3 · H₂, 4/3 · H₃)`` with Hₙ the entropy (bits) of its n-gram frequencies;
averaged over texts. Deviation: words are split by a regular expression instead of NLTK's
``word_tokenize`` (no extra dependency); on English prose the two agree up to punctuation
details.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")
_WEIGHTS = {2: 2 / 3, 3: 4 / 3}


def ngram_entropy(text: str) -> float:
    words = _WORD.findall(text)
    parts = []
    for n, w in _WEIGHTS.items():
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


def fluency(texts: Sequence[str]) -> float:
    """Mean weighted n-gram entropy of ``texts`` (ROME's "GE")."""
    return sum(ngram_entropy(t) for t in texts) / len(texts) if texts else float("nan")
