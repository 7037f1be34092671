"""Qwen2 / Qwen2.5: the standard decoder mapping with q/k/v biases always; sliding-window
attention only where ``use_sliding_window`` is set (the converter refuses a window shorter
than the context)."""

from typing import Any

from metaapo_nemo.models.families.base import Family


def _window(cfg: dict[str, Any]) -> int | None:
    return cfg.get("sliding_window") if cfg.get("use_sliding_window") else None


FAMILY = Family(model_type="qwen2", qkv_bias=True, sliding_window=_window)
