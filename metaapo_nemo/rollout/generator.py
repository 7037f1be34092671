"""The `Generator` seam: prompts (token ids) in, K samples per prompt with log-probs out.

Legend: P prompts in a batch, K samples per prompt, L_p prompt tokens, L_s sample tokens.

A generator is one inference engine holding a copy of the policy's weights. Every weight
push carries the policy optimiser step the weights belong to (`load_weights(buckets,
policy_step)`), and every `generate` call states the step the caller expects
(`policy_step`): an engine holding older (or half-loaded) weights refuses to generate
(`StaleWeightsError`), so the trainer can never train on samples from a policy it did not
mean to sample from.

Sampling is reproducible: sample k of prompt `key` in round `r` is drawn with the seed
`derive_seed(settings.seed, r, key, k)`, independent of how prompts are batched, split
over engines or ordered. Log-probs are those of the distribution actually sampled from
(after temperature and top-p: vLLM's `processed_logprobs`).

Backends: `metaapo_nemo.rollout.vllm_backend.VllmGenerator` (CPU and GPU). Unit tests use a
small stand-in (tests/rollout_fakes.py) that never ships.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

Message = dict[str, str]  # {"role": ..., "content": ...}
WeightBucket = Sequence[tuple[str, torch.Tensor]]  # HF-named full tensors, whole fusion groups


class RolloutError(RuntimeError):
    """Base class of generation / weight-push failures; messages name the step and batch."""


class StaleWeightsError(RolloutError):
    """The engine's weights are not those of the policy step the caller generates for."""


class RefitError(RolloutError):
    """A weight push failed; the engine is marked stale until a later push succeeds."""

    def __init__(self, message: str, policy_step: int, bucket: int | None = None):
        super().__init__(message)
        self.policy_step = policy_step
        self.bucket = bucket


class GenerationError(RolloutError):
    """The engine failed while generating a prompt batch."""


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample (filled from the `rollout` config section).

    Attributes:
        n: Samples per prompt (K).
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus mass kept (1.0 = all).
        max_new_tokens: Generation cut-off; such samples report finish_reason "length".
        stop_token_ids: Extra stop tokens; the model's EOS always stops.
        seed: Base of the per-sample seeds, or None to use only the engine's seed.
    """

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = 0

    def validate(self) -> None:
        """Raises ValueError naming the config key for an unusable value."""
        if self.n < 1:
            raise ValueError(f"rollout.samples_per_prompt={self.n} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens} must be >= 1")

    @classmethod
    def from_config(cls, rollout: Any) -> SamplingSettings:
        """From a `RolloutConfig` (config.schema)."""
        return cls(
            n=rollout.samples_per_prompt,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            max_new_tokens=rollout.max_new_tokens,
            stop_token_ids=tuple(rollout.stop_token_ids),
            seed=rollout.seed,
        )


@dataclass(frozen=True)
class PromptBatch:
    """Prompts to sample from, with stable keys (dataset indices) that seed the samples.

    Attributes:
        prompt_ids: P prompts, each a tuple of L_p token ids (chat template applied).
        keys: P distinct integer keys (e.g. the prompt's index in the dataset).
        round: The MetaAPO round (part of every sample's seed).
        messages: Optional P chat histories, for the reward model's own template.
    """

    prompt_ids: tuple[tuple[int, ...], ...]
    keys: tuple[int, ...]
    round: int = 0
    messages: tuple[tuple[Message, ...], ...] | None = None

    @classmethod
    def build(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        keys: Sequence[int] | None = None,
        round: int = 0,
        messages: Sequence[Sequence[Message]] | None = None,
    ) -> PromptBatch:
        """Builds and validates a batch from lists (keys default to 0..P-1)."""
        batch = cls(
            prompt_ids=tuple(tuple(int(t) for t in p) for p in prompt_ids),
            keys=tuple(range(len(prompt_ids))) if keys is None else tuple(int(k) for k in keys),
            round=round,
            messages=None if messages is None else tuple(tuple(m) for m in messages),
        )
        batch.validate()
        return batch

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def validate(self) -> None:
        """Raises ValueError for mismatched lengths, duplicate keys or empty prompts."""
        if len(self.keys) != len(self.prompt_ids):
            raise ValueError(f"{len(self.prompt_ids)} prompts but {len(self.keys)} keys")
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"prompt keys must be distinct (they seed the samples): {self.keys}")
        if self.messages is not None and len(self.messages) != len(self.prompt_ids):
            raise ValueError(
                f"{len(self.prompt_ids)} prompts but {len(self.messages)} message lists"
            )
        empty = [k for k, p in zip(self.keys, self.prompt_ids) if not p]
        if empty:
            raise ValueError(f"prompts with keys {empty} have no tokens")

    def select(self, indices: Sequence[int]) -> PromptBatch:
        """The sub-batch at `indices` (same round)."""
        return PromptBatch(
            prompt_ids=tuple(self.prompt_ids[i] for i in indices),
            keys=tuple(self.keys[i] for i in indices),
            round=self.round,
            messages=None if self.messages is None else tuple(self.messages[i] for i in indices),
        )

    def describe(self, limit: int = 8) -> str:
        """'round 3, 12 prompts, keys [4, 9, ...]' for error messages."""
        shown = ", ".join(str(k) for k in self.keys[:limit])
        more = ", ..." if len(self.keys) > limit else ""
        return f"round {self.round}, {len(self)} prompts, keys [{shown}{more}]"


@dataclass(frozen=True)
class Sample:
    """One generation.

    Attributes:
        k: Index of the sample among its prompt's K (part of its seed).
        token_ids: L_s generated token ids (a stop/EOS token that ended it is included).
        text: Detokenised text (special tokens skipped).
        finish_reason: "stop" (EOS or a stop token) or "length" (cut at max_new_tokens).
        logprobs: L_s log-probs of the sampled tokens under the sampled distribution.
    """

    k: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    logprobs: tuple[float, ...]

    @property
    def truncated(self) -> bool:
        """Cut at max_new_tokens instead of ending on its own."""
        return self.finish_reason == "length"


@dataclass(frozen=True)
class PromptSamples:
    """The K samples of one prompt."""

    key: int
    prompt_ids: tuple[int, ...]
    samples: tuple[Sample, ...]


def derive_seed(base: int, round: int, key: int, k: int) -> int:
    """A 63-bit seed for sample k of prompt `key` in `round` (stable across runs/machines)."""
    digest = hashlib.sha256(f"{base}:{round}:{key}:{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_fresh(
    weights_step: int | None, stale_reason: str | None, policy_step: int, what: str
) -> None:
    """Raises StaleWeightsError unless the engine holds exactly `policy_step`'s weights.

    Args:
        weights_step: Step of the weights the engine holds (None: unknown/half-loaded).
        stale_reason: Why the engine is stale (a failed push), if it is.
        policy_step: The step the caller generates for (the trainer's current step).
        what: The prompt batch description, for the message.
    """
    if weights_step == policy_step:
        return
    if weights_step is None:
        raise StaleWeightsError(
            f"refusing to generate for policy step {policy_step} ({what}): the engine's "
            f"weights are not valid: {stale_reason or 'never loaded'}; push the current "
            "weights (a successful refit) first"
        )
    older = "older than" if weights_step < policy_step else "newer than"
    raise StaleWeightsError(
        f"refusing to generate for policy step {policy_step} ({what}): the engine holds "
        f"the weights of step {weights_step}, {older} the trainer's; push the current "
        "weights (refit) before generating"
    )


@runtime_checkable
class Generator(Protocol):
    """An inference engine with a copy of the policy (one per engine host rank)."""

    @property
    def weights_step(self) -> int | None:
        """Policy step of the loaded weights; None while stale (failed or partial push)."""
        ...

    def generate(
        self, batch: PromptBatch, settings: SamplingSettings, policy_step: int
    ) -> list[PromptSamples]:
        """K samples per prompt, in batch order.

        Raises:
            StaleWeightsError: If `weights_step != policy_step`.
            GenerationError: If the engine fails (message names the batch and the step).
        """
        ...

    def load_weights(self, buckets: Iterable[WeightBucket], policy_step: int) -> None:
        """Pushes one full set of weights (consumed bucket by bucket) for `policy_step`.

        The engine is stale from the first bucket until the last one is in; on success it
        holds `policy_step`'s weights (prefix cache reset). On failure it stays stale.

        Raises:
            RefitError: With the step and the bucket index that failed.
        """
        ...

    def load_adapters(self, tensors: dict[str, torch.Tensor], config: dict, policy_step: int) -> None:
        """Pushes the policy as LoRA adapters over the engine's base weights (``lora.refit=adapters``).

        `tensors` are PEFT-named full factors (``base_model.model.<module>.lora_A.weight`` [r, in],
        ``...lora_B.weight`` [out, r]); `config` is PEFT's adapter config (r, lora_alpha,
        target_modules). They replace any earlier adapter; the base weights are those the engine
        was built from. On success the engine generates `policy_step`'s policy; on failure it
        stays stale.

        Raises:
            RefitError: With the step, if the engine cannot take them.
        """
        ...

    def sleep(self) -> None:
        """Frees accelerator memory (weights offloaded, KV cache dropped) while training.

        Engines start asleep. `load_weights` and `generate` wake what they need in the
        order weights -> push -> KV cache, so a caller cannot wake them in the wrong order.
        """
        ...

    def wake(self) -> None:
        """Brings the weights back (before a push); the KV cache follows on `generate`."""
        ...

    def shutdown(self) -> None:
        """Releases the engine (idempotent)."""
        ...


def split_under_budget(
    lengths: Sequence[int],
    max_new_tokens: int,
    token_budget: int,
    kv_blocks: int | None = None,
    block_size: int = 16,
) -> list[list[int]]:
    """Splits requests (prompt lengths) into calls that never chunk a prefill or preempt.

    A call's prefills all fit in the engine's first scheduler step when the prompt tokens
    plus one decode token per request stay within `token_budget`; and none is preempted
    (preemption re-runs a prefill, possibly chunked) when the KV blocks of every request
    at full length fit in `kv_blocks`. Order is kept.

    Args:
        lengths: Prompt length of each request.
        max_new_tokens: Longest generation per request.
        token_budget: The engine's ``max_num_batched_tokens``.
        kv_blocks: KV-cache blocks of the engine (None: unbounded).
        block_size: Tokens per KV block.

    Returns:
        Lists of request indices, one per engine call.

    Raises:
        ValueError: If one request alone exceeds the budget or the KV cache.
    """
    calls: list[list[int]] = []
    current: list[int] = []
    tokens = blocks = 0
    for i, n in enumerate(lengths):
        need_blocks = -(-(n + max_new_tokens) // block_size)
        if n + 1 > token_budget:
            raise ValueError(
                f"a prompt of {n} tokens does not fit rollout.max_num_batched_tokens="
                f"{token_budget} (needs >= {n + 1}); raise it or shorten data.max_prompt_length"
            )
        if kv_blocks is not None and need_blocks > kv_blocks:
            raise ValueError(
                f"a request of {n} prompt + {max_new_tokens} new tokens needs {need_blocks} KV "
                f"blocks of {block_size} tokens but the engine has {kv_blocks}; raise "
                "rollout.kv_cache_memory_mb (CPU) or lower rollout.max_new_tokens"
            )
        over_budget = tokens + n + 1 > token_budget
        over_kv = kv_blocks is not None and blocks + need_blocks > kv_blocks
        if current and (over_budget or over_kv):
            calls.append(current)
            current, tokens, blocks = [], 0, 0
        current.append(i)
        tokens += n + 1
        blocks += need_blocks
    if current:
        calls.append(current)
    return calls
