"""Qwen3 (dense): the standard decoder mapping plus a per-head RMSNorm on the queries and the
keys before RoPE (``self_attn.q_norm`` / ``self_attn.k_norm``, weights of size head_dim,
replicated under tensor parallelism: megatron's ``q_layernorm`` / ``k_layernorm`` with
``qk_layernorm=True``); no q/k/v biases unless ``attention_bias`` says so; ``head_dim`` is
explicit (it need not be hidden_size / heads); sliding windows only with
``use_sliding_window`` (refused when shorter than the context)."""

from typing import Any

from metaapo_nemo.models.families.base import STANDARD_LAYER, STANDARD_SHAPES, Family


def _window(cfg: dict[str, Any]) -> int | None:
    return cfg.get("sliding_window") if cfg.get("use_sliding_window") else None


LAYER = STANDARD_LAYER | {
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
}

SHAPES = STANDARD_SHAPES | {
    "self_attn.q_norm.weight": lambda a: (a.head_dim,),
    "self_attn.k_norm.weight": lambda a: (a.head_dim,),
}

FAMILY = Family(model_type="qwen3", layer=LAYER, qk_norm=True, sliding_window=_window, shapes=SHAPES)
