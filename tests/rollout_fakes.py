"""CPU stand-ins for unit tests (never shipped as an implementation).

- `FakeGenerator`: a `Generator` that "samples" deterministic token ids from each sample's
  derived seed, records every bucket it receives (names and bytes), and can be told to
  fail at a given bucket of a push.
- `recording_llm`: a stand-in for ``vllm.LLM`` (same signatures as vLLM 0.32's) that
  records, in order, every call `VllmGenerator` makes on the engine, so the sleep / wake /
  push order can be checked without a GPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import Any

from metaapo_nemo.rollout.generator import (
    PromptBatch,
    PromptSamples,
    RefitError,
    Sample,
    SamplingSettings,
    WeightBucket,
    check_fresh,
    derive_seed,
)


class FakeGenerator:
    """Implements `metaapo_nemo.rollout.generator.Generator` without an engine."""

    def __init__(
        self,
        initial_step: int | None = 0,
        fail_at_bucket: int | None = None,
        eos_id: int = 3,
        vocab: int = 64,
    ):
        self._step = initial_step
        self._stale_reason: str | None = None
        self.fail_at_bucket = fail_at_bucket
        self.eos_id, self.vocab = eos_id, vocab
        self.bucket_bytes: list[int] = []
        self.bucket_names: list[list[str]] = []
        self.loaded: dict[str, object] = {}
        self.asleep = False
        self.closed = False
        self.generate_calls = 0

    @property
    def weights_step(self) -> int | None:
        return self._step

    def generate(
        self, batch: PromptBatch, settings: SamplingSettings, policy_step: int
    ) -> list[PromptSamples]:
        self.asleep = False  # like VllmGenerator: generating wakes what it needs
        check_fresh(self._step, self._stale_reason, policy_step, batch.describe())
        self.generate_calls += 1
        out = []
        for key, ids in zip(batch.keys, batch.prompt_ids):
            samples = []
            for k in range(settings.n):
                rng = random.Random(derive_seed(settings.seed or 0, batch.round, key, k))
                n = rng.randint(1, settings.max_new_tokens + 2)
                toks = [
                    rng.randrange(4, self.vocab) for _ in range(min(n, settings.max_new_tokens))
                ]
                reason = "length" if n > settings.max_new_tokens else "stop"
                if reason == "stop":
                    toks[-1] = self.eos_id
                samples.append(
                    Sample(
                        k, tuple(toks), " ".join(map(str, toks)), reason, tuple(-1.0 for _ in toks)
                    )
                )
            out.append(PromptSamples(key, ids, tuple(samples)))
        return out

    def load_weights(self, buckets: Iterable[WeightBucket], policy_step: int) -> None:
        self._step, self._stale_reason = None, f"push for step {policy_step} in progress"
        for b, bucket in enumerate(buckets):
            if b == self.fail_at_bucket:
                self._stale_reason = f"push for step {policy_step} failed at bucket {b}"
                raise RefitError(
                    f"injected failure at bucket {b} of step {policy_step}", policy_step, b
                )
            self.bucket_names.append([n for n, _ in bucket])
            self.bucket_bytes.append(sum(t.numel() * t.element_size() for _, t in bucket))
            self.loaded.update({n: t.clone() for n, t in bucket})
        self._step, self._stale_reason = policy_step, None

    def load_adapters(self, tensors: dict, config: dict, policy_step: int) -> None:
        self.bucket_names.append(sorted(tensors))
        self.bucket_bytes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        self.loaded = {n: t.clone() for n, t in tensors.items()} | {"adapter_config": dict(config)}
        self._step, self._stale_reason = policy_step, None

    def sleep(self) -> None:
        self.asleep = True

    def wake(self) -> None:
        self.asleep = False

    def shutdown(self) -> None:
        self.closed = True


def recording_llm(events: list[str], reset_result: bool | None = True, blocks: int = 64) -> type:
    """A ``vllm.LLM`` stand-in class whose instances append their calls to `events`.

    Args:
        events: Receives "build", "sleep(level=1)", "wake_up(['weights'])",
            "reload_weights", "reset_prefix_cache", "generate(N)", "shutdown", ...
        reset_result: What ``reset_prefix_cache`` returns (None: older V1 engines).
        blocks: KV blocks reported by the cache config.
    """

    class RecordingLLM:
        def __init__(self, model: str, **kwargs: Any) -> None:
            self.kwargs = dict(model=model, **kwargs)
            cache = SimpleNamespace(num_gpu_blocks=blocks, block_size=16)
            self.llm_engine = SimpleNamespace(
                vllm_config=SimpleNamespace(cache_config=cache),
                engine_core=SimpleNamespace(shutdown=lambda: events.append("shutdown")),
            )
            events.append("build")

        def generate(
            self,
            prompts: Sequence[Any],
            sampling_params: Sequence[Any] | None = None,
            *,
            use_tqdm: bool = True,
            lora_request: Any = None,
        ) -> list[Any]:
            events.append(f"generate({len(prompts)})" if lora_request is None else
                          f"generate({len(prompts)}, lora={lora_request.lora_int_id})")
            out = []
            for params in sampling_params:
                ids = [5] * params.max_tokens
                lps = [{5: SimpleNamespace(logprob=-0.5)} for _ in ids]
                sample = SimpleNamespace(
                    token_ids=ids, text="x", finish_reason="length", logprobs=lps
                )
                out.append(SimpleNamespace(outputs=[sample]))
            return out

        def collective_rpc(
            self,
            method: str | Callable[..., Any],
            timeout: float | None = None,
            args: tuple = (),
            kwargs: dict[str, Any] | None = None,
        ) -> list[Any]:
            name = method if isinstance(method, str) else method.__name__
            events.append(name.lstrip("_"))
            return [name == "reload_supports_iterator"]

        def reset_prefix_cache(
            self, reset_running_requests: bool = False, reset_connector: bool = False
        ) -> bool | None:
            events.append("reset_prefix_cache")
            return reset_result

        def sleep(self, level: int = 1, mode: str = "abort") -> None:
            events.append(f"sleep(level={level})")

        def wake_up(self, tags: list[str] | None = None) -> bool:
            events.append(f"wake_up({tags})")
            return True

    return RecordingLLM
