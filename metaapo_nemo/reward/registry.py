"""Reward backends by name: ``reward.backend`` -> a builder of the configured `RewardModel`.

Each builder imports its backend when called, so choosing ``rule`` never imports
transformers' model classes and the seam (`reward.base`) never imports a backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from metaapo_nemo.reward.base import RewardModel


def _rule(r: Any, cache_dir: str | None) -> RewardModel:
    from metaapo_nemo.reward.rule import RuleReward

    return RuleReward(r.callable)


def _hf(r: Any, cache_dir: str | None) -> RewardModel:
    from metaapo_nemo.reward.hf import HFRewardModel

    path = r.path
    if r.tiny is not None:
        from metaapo_nemo.models.tiny import TinyModelSpec
        from metaapo_nemo.reward.tiny_rm import ensure_tiny_reward_model

        if cache_dir is None:
            raise ValueError("reward.tiny needs a cache directory to build the tiny RM in")
        path = str(ensure_tiny_reward_model(TinyModelSpec(**r.tiny.model_dump()), cache_dir))
    return HFRewardModel(
        path, batch_size=r.batch_size, dtype=r.dtype, offload_to_cpu=r.offload_to_cpu
    )


#: ``reward.backend`` -> builder(reward config section, cache dir).
BACKENDS: dict[str, Callable[[Any, str | None], RewardModel]] = {"rule": _rule, "hf": _hf}


def build_reward_model(cfg: Any, cache_dir: str | None = None) -> RewardModel:
    """The configured reward model (`Config` or its ``reward`` section; `cache_dir` for a tiny RM)."""
    r = cfg.reward if hasattr(cfg, "reward") else cfg
    if r.backend not in BACKENDS:
        raise ValueError(f"reward.backend={r.backend!r}; use one of {sorted(BACKENDS)}")
    return BACKENDS[r.backend](r, cache_dir)
