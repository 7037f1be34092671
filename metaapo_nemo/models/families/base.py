"""The `Family` record and the standard decoder's mapping (Llama-style names) it starts from.

Split kinds (how a Megatron tensor relates to its HF tensors under tensor parallelism):
``replicated`` (norms), ``row`` (row-parallel: split on dim 1), ``gate_up`` ([gate; up] per
rank), ``qkv`` (fused Q/K/V per query group), ``vocab`` (vocab-parallel, padded to TP).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from metaapo_nemo.models.arch import ModelArch

Mapping = dict[str, tuple[str, tuple[str, ...]]]  # megatron name -> (split kind, HF names)
# HF name (under ``model.layers.{i}.``, or global; an expert's index as ``{e}``) -> its full shape
Shapes = dict[str, Callable[["ModelArch"], tuple[int, ...]]]

# Megatron local-name suffix within a layer -> (kind, HF names in model.layers.{i}.)
STANDARD_LAYER: Mapping = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": ("qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                "self_attn.v_proj.bias")),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("gate_up", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
    # Transformer Engine spec: the norms are fused into the following linear layers.
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
}
# Megatron names outside the layers -> (kind, HF names)
STANDARD_GLOBAL: Mapping = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("replicated", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}


def _q(a: "ModelArch") -> int:
    return a.num_attention_heads * a.head_dim


def _kv(a: "ModelArch") -> int:
    return a.num_kv_heads * a.head_dim


# The full HF shape of every tensor the standard decoder streams (export, refit): what a rank
# that does not own a tensor allocates to receive it.
STANDARD_SHAPES: Shapes = {
    "model.embed_tokens.weight": lambda a: (a.vocab_size, a.hidden_size),
    "lm_head.weight": lambda a: (a.vocab_size, a.hidden_size),
    "model.norm.weight": lambda a: (a.hidden_size,),
    "input_layernorm.weight": lambda a: (a.hidden_size,),
    "post_attention_layernorm.weight": lambda a: (a.hidden_size,),
    "self_attn.q_proj.weight": lambda a: (_q(a), a.hidden_size),
    "self_attn.k_proj.weight": lambda a: (_kv(a), a.hidden_size),
    "self_attn.v_proj.weight": lambda a: (_kv(a), a.hidden_size),
    "self_attn.q_proj.bias": lambda a: (_q(a),),
    "self_attn.k_proj.bias": lambda a: (_kv(a),),
    "self_attn.v_proj.bias": lambda a: (_kv(a),),
    "self_attn.o_proj.weight": lambda a: (a.hidden_size, _q(a)),
    "mlp.gate_proj.weight": lambda a: (a.intermediate_size, a.hidden_size),
    "mlp.up_proj.weight": lambda a: (a.intermediate_size, a.hidden_size),
    "mlp.down_proj.weight": lambda a: (a.hidden_size, a.intermediate_size),
}
_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")
_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def _no_window(cfg: dict[str, Any]) -> int | None:
    return cfg.get("sliding_window")


@dataclass(frozen=True)
class Family:
    """A model family's conversion facts.

    Attributes:
        model_type: HF ``config.json`` ``model_type``.
        layer: Megatron per-layer parameter suffix -> (split kind, HF names under
            ``model.layers.{i}.``).
        globals: Megatron parameters outside the layers -> (split kind, HF names).
        qkv_bias: Whether q/k/v carry biases whatever the config says (Qwen2), else the
            config's ``attention_bias`` decides.
        sliding_window: The config's effective sliding window (None: full attention), which
            the converter refuses when shorter than the context.
        qk_norm: A per-head RMSNorm on queries and keys before RoPE (Qwen3: megatron's
            ``qk_layernorm``).
        experts: Mixture-of-experts layers: Megatron per-layer suffixes with ``{e}`` (the
            expert's index on its expert-parallel rank) -> (split kind, HF names with ``{e}``,
            the global index); see `expert_sources`.
        moe: Whether the config's MoE keys (experts, top-k, MoE width) shape `ModelArch`.
        shapes: Every streamed HF tensor's full shape as a function of `ModelArch` (see
            `hf_shape`), keyed like the mapping's HF names.
    """

    model_type: str
    layer: Mapping = field(default_factory=lambda: dict(STANDARD_LAYER))
    globals: Mapping = field(default_factory=lambda: dict(STANDARD_GLOBAL))
    qkv_bias: bool = False
    sliding_window: Callable[[dict[str, Any]], int | None] = _no_window
    qk_norm: bool = False
    experts: Mapping = field(default_factory=dict)
    moe: bool = False
    shapes: Shapes = field(default_factory=lambda: dict(STANDARD_SHAPES))

    def hf_shape(self, name: str, arch: ModelArch) -> tuple[int, ...]:
        """The full shape of the HF tensor ``name`` (``model.layers.3.self_attn.q_norm.weight``).

        Raises:
            KeyError: A name this family's `shapes` lacks (a mapping without its shape).
        """
        key = _EXPERT_INDEX.sub(".experts.{e}.", _LAYER_PREFIX.sub("", name))
        if key not in self.shapes:
            raise KeyError(f"{name}: the {self.model_type} family (metaapo_nemo/models/families/{self.model_type}.py) "
                           f"has no shape for {key!r}; shapes: {sorted(self.shapes)}")
        return self.shapes[key](arch)

    def expert_sources(self, suffix: str, local_experts: int, ep_rank: int) -> tuple[str, tuple[str, ...]] | None:
        """(kind, HF names under ``model.layers.{i}.``) of an expert parameter, or None.

        ``suffix`` is the Megatron name inside a layer; its local expert index ``le`` on
        expert-parallel rank ``ep_rank`` is the global expert ``ep_rank * local_experts + le``.
        """
        for pattern, (kind, hf) in self.experts.items():
            head, _, tail = pattern.partition("{e}")
            if suffix.startswith(head) and suffix.endswith(tail) and len(suffix) > len(head) + len(tail):
                index = suffix[len(head):len(suffix) - len(tail)]
                if index.isdigit():
                    e = ep_rank * local_experts + int(index)
                    return kind, tuple(h.replace("{e}", str(e)) for h in hf)
        return None

    def has_qkv_bias(self, cfg: dict[str, Any]) -> bool:
        return self.qkv_bias or bool(cfg.get("attention_bias", False))
