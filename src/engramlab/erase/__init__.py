"""Concept erasure in the weights: concept vectors, sparse features, fine-tuning baselines.

Every method returns a :class:`~engramlab.WeightDelta`.
"""

from __future__ import annotations

from .concept_vectors import Candidate, ConceptVectors, find_concept_vectors, vectors_delta
from .dictionary import TopKDictionary, train_dictionary
from .features import FeatureEraser, features_delta

__all__ = ["Candidate", "ConceptVectors", "FeatureEraser", "TopKDictionary",
           "features_delta", "find_concept_vectors", "train_dictionary", "vectors_delta"]
