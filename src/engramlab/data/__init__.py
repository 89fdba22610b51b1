"""Edit records, data-format loaders, bundled fact sets and text corpora."""

from .bundled import bundled_cases, bundled_facts_path
from .concepts import (
    Concept,
    Probe,
    bundled_concepts,
    controls_for,
    general_text,
    get_concept,
    load_concept,
    unseen_controls_for,
)
from .corpus import TextCorpus, get_corpus, sample_corpus, wiki_corpus
from .loaders import detect_format, load_cases, load_facts, load_requests, parse_cases, save_cases
from .pararel import pararel_cases
from .records import EditCase, EditRequest, Fact

__all__ = [
    "Concept",
    "EditCase",
    "EditRequest",
    "Fact",
    "Probe",
    "TextCorpus",
    "bundled_cases",
    "bundled_concepts",
    "bundled_facts_path",
    "controls_for",
    "detect_format",
    "general_text",
    "get_concept",
    "get_corpus",
    "load_cases",
    "load_concept",
    "load_facts",
    "load_requests",
    "pararel_cases",
    "parse_cases",
    "sample_corpus",
    "save_cases",
    "unseen_controls_for",
    "wiki_corpus",
]
