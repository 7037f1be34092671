"""A CPU stand-in `Generator` for unit tests (never shipped as an implementation).

It "samples" deterministic token ids from each sample's derived seed, records every bucket
it receives (names and bytes), and can be told to fail at a given bucket of a push.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from metaapo_nemo.rollout.generator import (
    GenerationError,
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
        if self.asleep:
            raise GenerationError("asleep")
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

    def sleep(self) -> None:
        self.asleep = True

    def wake(self) -> None:
        self.asleep = False

    def shutdown(self) -> None:
        self.closed = True
