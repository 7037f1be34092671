"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k RMSNorm) with a
sparse MLP in every layer: a router (``mlp.gate``, [experts, hidden], replicated) and
``num_experts`` SwiGLU experts (``mlp.experts.{e}.{gate,up,down}_proj``), softmax over the
experts, top ``num_experts_per_tok``, renormalised when ``norm_topk_prob``; no shared expert.

Megatron: ``num_moe_experts`` with megatron's router (``mlp.router.weight``) and experts that
are local to an expert-parallel rank: ``mlp.experts.local_experts.{e}.linear_fc{1,2}.weight``
(local spec, SequentialMLP) or ``mlp.experts.linear_fc{1,2}.weight{e}`` (Transformer Engine
spec, grouped GEMM); ``{e}`` is the LOCAL expert index, the HF name takes the global one
(`Family.expert_index`). Layers with a dense MLP (``mlp_only_layers``, a
``decoder_sparse_step`` above 1) are refused by `arch_from_hf_dict`.
"""

from typing import Any

from metaapo_nemo.models.families.base import Family
from metaapo_nemo.models.families.qwen3 import LAYER as QWEN3_LAYER
from metaapo_nemo.models.families.qwen3 import SHAPES as QWEN3_SHAPES


def _window(cfg: dict[str, Any]) -> int | None:
    return cfg.get("sliding_window") if cfg.get("use_sliding_window") else None


LAYER = {k: v for k, v in QWEN3_LAYER.items() if not k.startswith("mlp.linear_fc")} | {
    "mlp.router.weight": ("replicated", ("mlp.gate.weight",)),
}
EXPERTS = {
    "mlp.experts.local_experts.{e}.linear_fc1.weight": ("gate_up", ("mlp.experts.{e}.gate_proj.weight",
                                                                    "mlp.experts.{e}.up_proj.weight")),
    "mlp.experts.local_experts.{e}.linear_fc2.weight": ("row", ("mlp.experts.{e}.down_proj.weight",)),
    "mlp.experts.linear_fc1.weight{e}": ("gate_up", ("mlp.experts.{e}.gate_proj.weight",
                                                     "mlp.experts.{e}.up_proj.weight")),
    "mlp.experts.linear_fc2.weight{e}": ("row", ("mlp.experts.{e}.down_proj.weight",)),
}

SHAPES = {k: v for k, v in QWEN3_SHAPES.items() if not k.startswith("mlp.")} | {
    "mlp.gate.weight": lambda a: (a.num_experts, a.hidden_size),
    "mlp.experts.{e}.gate_proj.weight": lambda a: (a.moe_intermediate_size, a.hidden_size),
    "mlp.experts.{e}.up_proj.weight": lambda a: (a.moe_intermediate_size, a.hidden_size),
    "mlp.experts.{e}.down_proj.weight": lambda a: (a.hidden_size, a.moe_intermediate_size),
}

FAMILY = Family(model_type="qwen3_moe", layer=LAYER, experts=EXPERTS, qk_norm=True, sliding_window=_window,
                moe=True, shapes=SHAPES)
