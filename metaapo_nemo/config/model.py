"""The model sections: ``ModelConfig`` (the policy and reference checkpoint, dtype, layer
implementation, FP8) and ``TinyModelConfig`` (a small random model built locally, for the
policy or a reward model). Importable from ``metaapo_nemo.config.schema`` as well.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from metaapo_nemo.config.base import _divisors, _or_list, _Section
from metaapo_nemo.models.arch import LORA_TARGETS

__all__ = ["LoraConfig", "ModelConfig", "TinyModelConfig"]


class TinyModelConfig(_Section):
    """A small random model built locally (saved in HF format, then imported as usual)."""

    arch: Literal["llama", "qwen2", "qwen3", "qwen3_moe"] = "llama"
    vocab_size: int = Field(512, gt=0)
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    max_position_embeddings: int = Field(1024, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool | None = None  # None: the architecture's usual choice
    seed: int = 0

    @model_validator(mode="after")
    def _check_shape(self) -> TinyModelConfig:
        h, heads, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        errors = []
        if h % heads:
            lo = (h // heads) * heads
            errors.append(
                f"model.tiny.hidden_size={h} is not divisible by "
                f"model.tiny.num_attention_heads={heads} (head_dim = {h} / {heads} = "
                f"{h / heads:g}); use hidden_size {_or_list([x for x in (lo, lo + heads) if x])}"
                f" or num_attention_heads {_or_list(_divisors(h)[:8])}"
            )
        elif (h // heads) % 2:
            errors.append(
                f"head_dim = model.tiny.hidden_size={h} / model.tiny.num_attention_heads="
                f"{heads} = {h // heads} is odd; RoPE needs an even head_dim, e.g. "
                f"hidden_size={2 * h}"
            )
        if heads % kv:
            errors.append(
                f"model.tiny.num_attention_heads={heads} is not divisible by "
                f"model.tiny.num_key_value_heads={kv} ({heads} / {kv} = {heads / kv:g}); "
                f"use num_key_value_heads {_or_list(_divisors(heads))}"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self


class ModelConfig(_Section):
    """The policy (and reference) model: an HF checkpoint directory or a tiny model."""

    path: str | None = None
    tiny: TinyModelConfig | None = None
    # An HF config.json of the architecture, read by --dry-run and the memory planner when
    # model.path is not reachable from this machine (e.g. conf/models/llama31_8b.json).
    arch_config: str | None = None
    # auto: bfloat16 on a CUDA machine (the paper's and every GPU recipe's), float32 on CPU
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # Layer implementation: auto = Transformer Engine on a CUDA machine with TE, else the
    # local (plain PyTorch) spec. FP8 needs TE + bf16 (models/layer_spec.py).
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    fp8: Literal["hybrid", "e4m3"] | None = None  # hybrid: E4M3 forward, E5M2 backward
    fp8_recipe: Literal["delayed", "tensorwise"] = "delayed"  # tensorwise: current scaling
    fp8_amax_history_len: int = Field(1024, gt=0)
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"

    def resolved_dtype(self, on_gpu: bool) -> str:
        """"float32" or "bfloat16": ``dtype``, with auto resolved for a GPU or a CPU machine
        (FP8 trains with bf16 master weights)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if on_gpu or self.fp8 is not None else "float32"

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelConfig:
        if self.path is None and self.tiny is None:
            raise ValueError(
                "set exactly one of model.path (an HF checkpoint directory) or model.tiny "
                "(a tiny random model, e.g. model.tiny.arch=llama); got neither"
            )
        if self.path is not None and self.tiny is not None:
            raise ValueError(
                f"set exactly one of model.path or model.tiny; got both (model.path="
                f"{self.path}); add model.tiny=null to use the checkpoint, or "
                "model.path=null to use the tiny model"
            )
        return self


class LoraConfig(_Section):
    """LoRA adapters on the policy's linear layers, the base frozen (models/lora.py). The
    reference (where the loss has one) is the same network with the adapters off; checkpoints
    and exports carry the adapters (export: a merged HF checkpoint and a PEFT adapter directory)."""

    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / rank (PEFT's)
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapters' input, as PEFT's lora_dropout
    # HF projection names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or "all-linear"
    target_modules: list[str] | str = "all-linear"
    # how each round's refit reaches the rollout engine: "adapters" pushes only the adapter
    # tensors (vLLM serves them as an in-memory LoRA over the unchanged base), "merged" pushes
    # every weight with the adapters merged in (the full-training push)
    refit: Literal["adapters", "merged"] = "adapters"
    # how a training forward/backward computes an adapted linear: "adapters" adds s B (A x) beside
    # the frozen GEMM (PEFT's way, any dropout, either spec); "merged" runs ONE GEMM on W + s B A,
    # merged once per schedule, and takes the adapters' gradients from their factors: faster, for
    # one transient copy of the adapted weights (planned), no dropout, megatron's local spec only
    compute: Literal["adapters", "merged"] = "adapters"

    @model_validator(mode="after")
    def _check_compute(self) -> LoraConfig:
        if self.compute == "merged" and self.dropout > 0:
            raise ValueError(
                f"lora.compute=merged with lora.dropout={self.dropout}: a merged weight computes B A x, not "
                "B A dropout(x); set lora.dropout=0 or lora.compute=adapters")
        return self

    @model_validator(mode="after")
    def _check_targets(self) -> LoraConfig:
        names = self._names()
        unknown = [n for n in names if n not in LORA_TARGETS]
        if unknown or not names:
            raise ValueError(
                f"lora.target_modules={self.target_modules!r}: unknown {', '.join(map(repr, unknown)) or '(empty)'}; "
                f"valid: {', '.join(LORA_TARGETS)}, or \"all-linear\" (every one of them)")
        return self

    def _names(self) -> list[str]:
        if self.target_modules == "all-linear":
            return list(LORA_TARGETS)
        return [self.target_modules] if isinstance(self.target_modules, str) else list(self.target_modules)

    def targets(self) -> tuple[str, ...]:
        """The targeted projections, in `LORA_TARGETS` order."""
        names = self._names()
        return tuple(n for n in LORA_TARGETS if n in names)
