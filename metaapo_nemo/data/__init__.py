"""Preference data: loading, validation, tokenisation, batching and a toy generator."""

from pathlib import Path

from metaapo_nemo.data.collate import PairBatch, collate_pairs, epoch_order, split_pairs
from metaapo_nemo.data.preference import (
    SKIP_REASONS,
    BadRowError,
    ChatTemplateError,
    DataSpec,
    PreferenceData,
    TokenizedPair,
    load_preference_data,
)

#: The committed toy sample (256 rows, written by `tasks.toy_prefs`).
TOY_SAMPLE_PATH = Path(__file__).parent / "samples" / "toy_prefs.jsonl"

__all__ = [
    "SKIP_REASONS",
    "TOY_SAMPLE_PATH",
    "BadRowError",
    "ChatTemplateError",
    "DataSpec",
    "PairBatch",
    "PreferenceData",
    "TokenizedPair",
    "collate_pairs",
    "epoch_order",
    "load_preference_data",
    "split_pairs",
]
