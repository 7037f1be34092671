"""Mistral: the standard decoder mapping; a ``sliding_window`` shorter than the context is
refused by the converter (v0.3 and later configs set it to null)."""

from metaapo_nemo.models.families.base import Family

FAMILY = Family(model_type="mistral")
