"""Typed configuration schema: ``Config`` and the training sections.

A recipe YAML (``conf/*.yaml``) is merged by ``loader.load_config`` and validated into
``Config``. Field constraints catch single bad values; the ``model_validator``s catch
combinations and fail with the key, the value, the arithmetic and the fix. Checks that need
the world size or the checkpoint's shape live in ``check_layout`` (config/checks.py), called at
start-up and by ``--dry-run``. Every default lives in the schema and nowhere else: here, in
config/model.py (model, model.tiny), config/online.py (metaapo, rollout, reward) and
config/runtime.py (run, checkpoint, planner, logging, eval). Names defined in those modules are
importable from here as before.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from metaapo_nemo.config.base import ConfigError, _Section, fmt
from metaapo_nemo.config.checks import (
    _context_error,
    _key_list,
    batch_error,
    check_layout,
    round_size_error,
    set_keys,
)
from metaapo_nemo.config.model import LoraConfig, ModelConfig, TinyModelConfig
from metaapo_nemo.config.online import MetaAPOConfig, RewardConfig, RolloutConfig
from metaapo_nemo.config.runtime import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    PlannerConfig,
    RunConfig,
)
from metaapo_nemo.models.arch import VLLM_LORA_RANKS

__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "EvalConfig",
    "LoggingConfig", "LoraConfig", "LossConfig", "MetaAPOConfig", "ModelConfig", "OptimConfig", "ParallelConfig",
    "PlannerConfig", "ReferenceConfig", "RewardConfig", "RolloutConfig", "RunConfig",
    "TinyModelConfig", "TrainConfig", "batch_error", "check_layout", "fmt", "round_size_error",
    "set_keys",
]

class ParallelConfig(_Section):
    """Megatron-Core parallel degrees; dp is derived from the world size."""

    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    vpp: int | None = Field(None, ge=1)
    cp: int = Field(1, ge=1)
    # Expert parallel (mixture-of-experts models): the experts of each layer are split over ep
    # ranks of the data x context parallel group; expert tensor parallel = tp.
    ep: int = Field(1, ge=1)
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
    # Extra variables of the policy's chat template, for every prompt and pair it renders (the
    # offline pairs, the rollout prompts, the evaluation): e.g. {enable_thinking: false} for
    # Qwen3's non-thinking mode (the prompt then ends in an empty <think></think> block).
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)


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
    # How a packed row's sequences are kept apart: thd = megatron's THD PackedSeqParams
    # (cu_seqlens: variable-length attention, RoPE restarting per sequence; what the
    # Transformer Engine spec runs, and the local spec with train.attention=sdpa), mask = a
    # block-diagonal mask with explicit positions (local spec only). auto: thd on the TE
    # spec, mask on the local spec.
    pack_format: Literal["auto", "mask", "thd"] = "auto"
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
    lora: LoraConfig | None = None  # null: every weight trains

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
        t, cp = self.train, self.parallel.cp
        if cp > 1 and (t.batching != "pack" or t.pack_format == "mask" or t.share_prompt):
            errors.append(
                f"parallel.cp={cp}: context parallelism splits every sequence of a THD-packed row over "
                f"the CP ranks, and only such rows (train.batching={t.batching}, train.pack_format="
                f"{t.pack_format}, train.share_prompt={t.share_prompt}); set train.batching=pack, "
                "train.pack_format=thd and train.share_prompt=false"
            )
        if self.lora is not None and self.reference.offload_to_cpu:
            errors.append(
                "reference.offload_to_cpu=true with lora: the reference is the policy with its adapters "
                "off (no second model), so there is nothing to offload; set reference.offload_to_cpu=false")
        if (self.lora is not None and self.lora.refit == "adapters" and self.rollout is not None
                and self.rollout.backend == "vllm" and self.lora.rank > VLLM_LORA_RANKS[-1]):
            errors.append(
                f"lora.rank={self.lora.rank} with lora.refit=adapters: vLLM serves LoRA adapters up to rank "
                f"{VLLM_LORA_RANKS[-1]}; set lora.refit=merged (every weight pushed, the adapters merged in) "
                f"or lora.rank <= {VLLM_LORA_RANKS[-1]}")
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


