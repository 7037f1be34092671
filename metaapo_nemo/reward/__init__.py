"""Reward models: the RewardModel seam, an HF sequence-classification RM, rule scorers.

Importing this package imports neither transformers models nor torch-heavy backends.
"""

from metaapo_nemo.reward.base import RewardError, RewardModel, score_batched
from metaapo_nemo.reward.registry import build_reward_model

__all__ = ["RewardError", "RewardModel", "build_reward_model", "score_batched"]
