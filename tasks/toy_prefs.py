"""A small synthetic preference dataset in the UltraFeedback-binarized schema.

Rows look like ``HuggingFaceH4/ultrafeedback_binarized`` rows (``prompt``, ``prompt_id``,
``chosen``, ``rejected``, ``score_chosen``, ``score_rejected``) on four simple themes:
arithmetic ("What is 3 + 4?"), short lists ("List three colours."), a sentence about a
topic and capital cities. The chosen answer is the better one (correct, on topic, concise);
the rejected one is worse (wrong, off topic, or rambling). Responses run from about 5 to
60 words. Generation is deterministic in ``(n, seed)`` and uses a private
``random.Random``, so the global RNG is untouched.

The committed sample ``metaapo_nemo/data/samples/toy_prefs.jsonl`` was written by::

    python -m tasks.toy_prefs --out metaapo_nemo/data/samples/toy_prefs.jsonl --n 256 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

SYSTEM_PROMPTS = ("You are a helpful assistant.", "Answer briefly and correctly.")

_LISTS: dict[str, tuple[str, ...]] = {
    "colours": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "fruits": ("apple", "banana", "cherry", "grape", "mango", "pear", "plum", "lemon"),
    "animals": ("cat", "dog", "horse", "rabbit", "tiger", "eagle", "whale", "fox"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "spade", "rake", "file"),
}

_TOPICS: dict[str, tuple[str, ...]] = {
    "the sea": ("The sea is wide, salty and always moving.",
                "Waves on the sea roll in slowly under a grey sky."),
    "autumn": ("In autumn the leaves turn red and gold before they fall.",
               "Autumn brings cool mornings and early dark evenings."),
    "cats": ("Cats sleep for most of the day and hunt at night.",
             "A cat purrs softly when it feels safe and warm."),
    "trains": ("Trains carry many people quickly between cities.",
               "The night train hums along the tracks toward the coast."),
    "music": ("Music can lift a tired mind in just a few notes.",
              "A simple song is often the one people remember."),
    "the moon": ("The moon lights the night and pulls on the tides.",
                 "A full moon rose slowly above the quiet hills."),
    "coffee": ("Fresh coffee smells rich and wakes people up.",
               "A warm cup of coffee starts many mornings."),
    "mountains": ("Mountains stand tall, cold and silent above the valleys.",
                  "Snow stays on the highest mountains all year."),
}

_CAPITALS: dict[str, str] = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
    "Germany": "Berlin", "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima",
    "Kenya": "Nairobi", "Norway": "Oslo",
}

_FILLER = (
    "Well, that is a really interesting question to think about.",
    "There are many ways to look at this, and people often disagree.",
    "Let me start by saying a few general things first.",
    "It reminds me of something I read a long time ago.",
    "Of course, it depends a lot on the context and on who is asking.",
    "Some would say the answer is obvious, but I am not so sure.",
    "Before answering, it helps to consider the history of the idea.",
    "In any case, it is worth taking a moment to reflect on it.",
    "Many experts have written long books about questions like this.",
    "I could go on about this for quite a while, honestly.",
)


def _ramble(rng: random.Random, min_words: int = 25, max_words: int = 52) -> str:
    """Returns off-target filler text of roughly ``min_words``..``max_words`` words."""
    target = rng.randint(min_words, max_words)
    sentences: list[str] = []
    words = 0
    for sentence in rng.sample(_FILLER, len(_FILLER)):
        n = len(sentence.split())
        if words + n > max_words:
            break
        sentences.append(sentence)
        words += n
        if words >= target:
            break
    return " ".join(sentences)


def _arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    prompt = f"What is {a} {op} {b}?"
    chosen = rng.choice((
        f"{a} {op} {b} = {value}.",
        f"The correct answer is {value}.",
        f"Computing {a} {op} {b} step by step gives {value}, so the answer is {value}.",
    ))
    wrong = value + rng.choice((-3, -2, -1, 1, 2, 10))
    rejected = rng.choice((
        f"{a} {op} {b} = {wrong}.",
        f"I think the answer is {wrong}, but I am not sure.",
        f"{_ramble(rng)} Anyway, it is probably {wrong}.",
    ))
    return prompt, chosen, rejected


def _listing(rng: random.Random) -> tuple[str, str, str]:
    kind = rng.choice(sorted(_LISTS))
    prompt = rng.choice((f"List three {kind}.", f"Name three {kind}, please."))
    items = rng.sample(_LISTS[kind], 3)
    chosen = rng.choice((
        f"Here are three {kind}: {items[0]}, {items[1]} and {items[2]}.",
        f"1. {items[0].capitalize()}\n2. {items[1].capitalize()}\n3. {items[2].capitalize()}",
    ))
    other = rng.choice([k for k in sorted(_LISTS) if k != kind])
    wrong = rng.sample(_LISTS[other], 3)
    rejected = rng.choice((
        f"Here are three {kind}: {wrong[0]}, {wrong[1]} and {wrong[2]}.",
        f"Here are some {kind}: {items[0]} and that is all I can think of.",
        f"{_ramble(rng)} One example is {items[0]}.",
    ))
    return prompt, chosen, rejected


def _sentence(rng: random.Random) -> tuple[str, str, str]:
    topic = rng.choice(sorted(_TOPICS))
    prompt = rng.choice((f"Write a short sentence about {topic}.",
                         f"Give me one sentence about {topic}."))
    chosen = rng.choice(_TOPICS[topic])
    other = rng.choice([t for t in sorted(_TOPICS) if t != topic])
    rejected = rng.choice((
        rng.choice(_TOPICS[other]),
        _ramble(rng),
        f"{_ramble(rng, 20, 45)} {rng.choice(_TOPICS[other])}",
    ))
    return prompt, chosen, rejected


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(_CAPITALS))
    city = _CAPITALS[country]
    prompt = f"What is the capital of {country}?"
    chosen = rng.choice((
        f"The capital of {country} is {city}.",
        f"{city} is the capital city of {country}.",
    ))
    wrong = rng.choice([c for k, c in sorted(_CAPITALS.items()) if k != country])
    rejected = rng.choice((
        f"The capital of {country} is {wrong}.",
        f"{_ramble(rng)} I believe it might be {wrong}.",
    ))
    return prompt, chosen, rejected


_THEMES: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _arithmetic, _listing, _sentence, _capital)


def _scores(rng: random.Random) -> tuple[float, float]:
    chosen = rng.choice((6.0, 7.0, 7.5, 8.0, 8.5, 9.0, 10.0))
    rejected = float(rng.randint(1, int(chosen) - 1))
    return chosen, rejected


def make_toy_rows(n: int, seed: int) -> list[dict]:
    """Generates ``n`` synthetic preference rows in the UltraFeedback-binarized schema.

    Args:
        n: Number of rows.
        seed: Seed of the private generator; equal ``(n, seed)`` give equal rows.

    Returns:
        Rows with ``prompt``, ``prompt_id`` (sha256 of the prompt), ``chosen`` and
        ``rejected`` (message lists ending with the assistant answer, sharing the same
        prompt messages, about 1 in 6 with a system message) and ``score_chosen`` >
        ``score_rejected`` in 1..10.

    Raises:
        ValueError: If ``n`` is negative.
    """
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, chosen, rejected = rng.choice(_THEMES)(rng)
        messages = [{"role": "user", "content": prompt}]
        if rng.random() < 1 / 6:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        score_chosen, score_rejected = _scores(rng)
        rows.append({
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
            "chosen": messages + [{"role": "assistant", "content": chosen}],
            "rejected": [dict(m) for m in messages] + [{"role": "assistant", "content": rejected}],
            "score_chosen": score_chosen,
            "score_rejected": score_rejected,
        })
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> None:
    """Writes rows as UTF-8 JSON lines (one object per line, ``\\n`` line endings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m tasks.toy_prefs --out FILE --n 256 --seed 0``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output .jsonl path")
    parser.add_argument("--n", type=int, default=256, help="number of rows")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args(argv)
    rows = make_toy_rows(args.n, args.seed)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
