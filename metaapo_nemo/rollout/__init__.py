"""Online generation: the Generator seam, the vLLM backend, weight refit, online pairs.

Importing this package does not import vLLM; `metaapo_nemo.rollout.vllm_backend` does.
"""

from metaapo_nemo.rollout.generator import (
    GenerationError,
    Generator,
    PromptBatch,
    PromptSamples,
    RefitError,
    RolloutError,
    Sample,
    SamplingSettings,
    StaleWeightsError,
    derive_seed,
)
from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup, build_rollout_group
from metaapo_nemo.rollout.pairs import AnnotationCounters, OnlinePair, annotate, make_pairs
from metaapo_nemo.rollout.refit import RefitStats, iter_buckets, push_weights

__all__ = [
    "AnnotationCounters",
    "EnginePlacement",
    "GenerationError",
    "Generator",
    "OnlinePair",
    "PromptBatch",
    "PromptSamples",
    "RefitError",
    "RefitStats",
    "RolloutError",
    "RolloutGroup",
    "Sample",
    "SamplingSettings",
    "StaleWeightsError",
    "annotate",
    "build_rollout_group",
    "derive_seed",
    "iter_buckets",
    "make_pairs",
    "push_weights",
]
