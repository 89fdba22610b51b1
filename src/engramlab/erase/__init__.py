"""Concept erasure in the weights: concept vectors, sparse features, fine-tuning baselines.

Every method returns a :class:`~engramlab.WeightDelta`.
"""

from __future__ import annotations

from .concept_vectors import Candidate, ConceptVectors, find_concept_vectors, vectors_delta
from .dictionary import TopKDictionary
from .features import FeatureEraser, output_features_delta

__all__ = ["Candidate", "ConceptVectors", "FeatureEraser", "TopKDictionary",
           "find_concept_vectors", "output_features_delta", "vectors_delta"]
