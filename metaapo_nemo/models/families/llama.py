"""Llama 2 / 3 / 3.1 (and SmolLM2): the standard decoder mapping; q/k/v biases only where
the config sets ``attention_bias``."""

from metaapo_nemo.models.families.base import Family

FAMILY = Family(model_type="llama")
