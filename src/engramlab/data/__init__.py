"""Edit records, data-format loaders, bundled fact sets and text corpora."""

from .bundled import bundled_cases, bundled_facts_path
from .corpus import TextCorpus, sample_corpus
from .loaders import detect_format, load_cases, load_requests, parse_cases, save_cases
from .pararel import pararel_cases
from .records import EditCase, EditRequest

__all__ = [
    "EditCase",
    "EditRequest",
    "TextCorpus",
    "bundled_cases",
    "bundled_facts_path",
    "detect_format",
    "load_cases",
    "load_requests",
    "pararel_cases",
    "parse_cases",
    "sample_corpus",
    "save_cases",
]
