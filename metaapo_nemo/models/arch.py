"""Model architecture facts read from an HF config, in plain Python.

`ModelArch` is the one description of a decoder-only checkpoint that the converter, the
Megatron model builder, the parallel-layout checks and the memory planner all read. It is
built from an HF `config.json` (Llama 3/3.1, Qwen2/2.5, Qwen3, Mistral) and refuses anything the
converter would get silently wrong (sliding-window attention shorter than the sequence,
unknown RoPE scaling, biases we do not map).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metaapo_nemo.models.families import SUPPORTED, family_of  # SUPPORTED: re-exported

# The tiny Qwen3-MoE's experts (of intermediate_size / 2) and top-k: models/tiny.py builds it;
# kept here so the dry run (config/cli.py) reads them without importing transformers.
TINY_EXPERTS, TINY_TOP_K = 4, 2

# The HF projections LoRA targets (PEFT's target_modules), in the order of a decoder layer.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The HF projections each of megatron's linears computes, fused in this order: qkv, o, gate_up, down
FUSED_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))

# The LoRA ranks a vLLM engine can be built for (its ``max_lora_rank`` choices): adapters of rank r
# go into slots of the smallest one >= r.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_slot_rank(rank: int) -> int:
    """The engine's ``max_lora_rank`` for adapters of `rank` (the smallest vLLM offers >= it)."""
    for slot in VLLM_LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"LoRA rank {rank} > {VLLM_LORA_RANKS[-1]}, the largest vLLM serves; refit merged weights")


def projection_shapes(hidden: int, heads: int, kv_heads: int, head_dim: int,
                      intermediate: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each of `LORA_TARGETS` (a LoRA A is [r, in], its B [out, r]); plain
    numbers, so the config checks and the planner use it without a `ModelArch` or torch."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden)}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: RopeScaling | None = None
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    # Mixture of experts (Qwen3-MoE): 0 experts = a dense MLP of intermediate_size
    num_experts: int = 0
    experts_per_token: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's SwiGLU width
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    router_aux_loss_coef: float = 0.0  # the checkpoint's load-balancing loss weight

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: attention (+ q/k/v biases, + q/k norms), the
        SwiGLU MLP and the two norms."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_attention_heads + 2 * self.num_kv_heads) + hd * self.num_attention_heads * h
        if self.qkv_bias:
            attn += hd * (self.num_attention_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * hd
        return attn + self.mlp_parameters + 2 * h

    @property
    def expert_parameters(self) -> int:
        """One layer's experts (every expert's SwiGLU; 0 for a dense model)."""
        return self.num_experts * 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def mlp_parameters(self) -> int:
        """One layer's MLP: dense SwiGLU, or the router plus every expert's SwiGLU."""
        if self.num_experts:
            return self.expert_parameters + self.num_experts * self.hidden_size
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def num_parameters(self) -> int:
        """Parameter count of the HF checkpoint (no vocabulary padding)."""
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_parameters + emb + self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        src = params if "factor" in params else legacy
        return float(theta), RopeScaling(
            factor=float(src["factor"]),
            low_freq_factor=float(src["low_freq_factor"]),
            high_freq_factor=float(src["high_freq_factor"]),
            original_max_position_embeddings=int(src["original_max_position_embeddings"]),
        )
    raise ValueError(
        f"RoPE scaling type '{rope_type}' is not supported by the converter; "
        "supported: default, llama3"
    )


def arch_from_hf_dict(cfg: dict[str, Any], source: str = "config") -> ModelArch:
    """Builds a ModelArch from an HF config dict (as in config.json).

    Raises:
        ValueError: for unsupported model types or features, naming the key.
    """
    model_type = cfg.get("model_type")
    family = family_of(model_type, source)
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = cfg.get("head_dim") or hidden // heads
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act={cfg['hidden_act']!r}; only silu (SwiGLU) is supported")
    if cfg.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    window = family.sliding_window(cfg)
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    if window is not None and int(window) < max_pos:
        raise ValueError(
            f"{source}: sliding_window={window} < max_position_embeddings={max_pos}; "
            "sliding-window attention is not implemented in the converter"
        )
    theta, scaling = _rope(cfg)
    qkv_bias = family.has_qkv_bias(cfg)
    moe = _moe(cfg, source) if family.moe else {}
    return ModelArch(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        rope_scaling=scaling,
        qk_norm=family.qk_norm,
        **moe,
    )


def _moe(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config; refuses what megatron's one-spec build cannot run."""
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    dense = list(cfg.get("mlp_only_layers") or [])
    if step != 1 or dense:
        raise ValueError(
            f"{source}: decoder_sparse_step={step}, mlp_only_layers={dense}: layers with a dense MLP "
            "between the MoE layers are not supported (every released Qwen3-MoE has an MoE MLP in "
            "every layer: decoder_sparse_step=1, mlp_only_layers=[])")
    if cfg.get("shared_expert_intermediate_size"):
        raise ValueError(f"{source}: shared_expert_intermediate_size is set: shared experts are not mapped")
    # the hub's configs say num_experts; transformers 5 saves it as num_local_experts
    experts = int(cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"])
    top_k = int(cfg["num_experts_per_tok"])
    if not 0 < top_k <= experts:
        raise ValueError(f"{source}: num_experts_per_tok={top_k} must be in 1..num_experts={experts}")
    return dict(num_experts=experts, experts_per_token=top_k, moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.0) or 0.0))


def load_arch(path: str | Path) -> ModelArch:
    """Reads `config.json` of an HF checkpoint directory (no transformers import).

    Raises:
        FileNotFoundError: naming the missing file and what to pass instead.
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{cfg_file} not found: model.path must be an HF checkpoint directory "
            "(with config.json and *.safetensors); or set model.tiny to build a tiny model"
        )
    return arch_from_hf_dict(json.loads(cfg_file.read_text()), source=str(cfg_file))
