"""Deterministic token-level preference pairs with chat-like length distributions.

Benchmarks and the batching tests need many pairs whose LENGTHS look like real chat
preference data (most prompts and answers short, a long tail up to the cap) without a
tokenizer or a download. The token ids are random (uniform over ``[low_id, vocab_size)``,
so special tokens below ``low_id`` never appear); only the shapes matter for speed and the
equality tests.

Lengths are log-normal, clipped to the requested range: a log-normal's median and spread
match the skew of UltraFeedback-style data (prompt median ~1/5 of the cap, responses
~1/3), which a uniform draw would not.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from metaapo_nemo.data.preference import TokenizedPair


@dataclass(frozen=True)
class LengthSpec:
    """Range and shape of one length distribution (tokens).

    Attributes:
        low: Shortest length (inclusive).
        high: Longest length (inclusive).
        median: Median of the log-normal before clipping; None = fixed length ``high``.
        sigma: Log-space standard deviation (larger = longer tail).
    """

    low: int
    high: int
    median: float | None = None
    sigma: float = 0.9

    def draw(self, rng: random.Random) -> int:
        """One length in ``[low, high]``."""
        if self.median is None:
            return self.high
        value = rng.lognormvariate(math.log(self.median), self.sigma)
        return int(min(self.high, max(self.low, round(value))))


def chat_lengths(prompt: tuple[int, int] = (16, 512), response: tuple[int, int] = (8, 512)
                 ) -> tuple[LengthSpec, LengthSpec]:
    """Prompt and response length specs skewed like chat data within the given ranges."""
    p_lo, p_hi = prompt
    r_lo, r_hi = response
    return (LengthSpec(p_lo, p_hi, median=max(p_lo, p_hi / 5), sigma=0.9),
            LengthSpec(r_lo, r_hi, median=max(r_lo, r_hi / 3), sigma=0.8))


def fixed_lengths(prompt: int, response: int) -> tuple[LengthSpec, LengthSpec]:
    """Every prompt ``prompt`` tokens, every response ``response`` tokens."""
    return LengthSpec(prompt, prompt), LengthSpec(response, response)


def synthetic_pairs(num_pairs: int, vocab_size: int, lengths: tuple[LengthSpec, LengthSpec],
                    seed: int = 0, low_id: int = 4, eos_id: int | None = None) -> list[TokenizedPair]:
    """``num_pairs`` pairs with independent chosen/rejected lengths, reproducible by seed.

    Args:
        num_pairs: How many pairs.
        vocab_size: Token ids are drawn from ``[low_id, vocab_size)``.
        lengths: (prompt spec, response spec); both responses use the response spec.
        seed: Seed of a private `random.Random` (the global RNGs are untouched).
        low_id: Smallest id drawn (keeps pad/bos/eos out of the content).
        eos_id: If set, every response ends with it (as tokenised chat data does).

    Returns:
        Pairs with ``index`` 0..num_pairs-1; chosen and rejected always differ.
    """
    if vocab_size <= low_id + 1:
        raise ValueError(f"vocab_size={vocab_size} must exceed low_id + 1 = {low_id + 1}")
    rng = random.Random(seed)
    p_spec, r_spec = lengths

    def tokens(n: int, end: bool) -> tuple[int, ...]:
        body = [rng.randrange(low_id, vocab_size) for _ in range(n - (1 if end else 0))]
        return tuple(body + ([eos_id] if end else []))

    pairs = []
    end = eos_id is not None
    for i in range(num_pairs):
        prompt = tokens(p_spec.draw(rng), False)
        chosen = tokens(r_spec.draw(rng), end)
        rejected = tokens(r_spec.draw(rng), end)
        if rejected == chosen:  # measure-zero for real lengths; keep the pair valid anyway
            rejected = (low_id + (rejected[0] - low_id + 1) % (vocab_size - low_id),) + rejected[1:]
        pairs.append(TokenizedPair(i, prompt, chosen, rejected))
    return pairs
