"""IFEval-style instruction following with a gold score from the IFEval checkers.

A prompt = one task template filled with a topic ("Describe coffee in a few sentences.")
plus one or two verifiable constraints, each phrased exactly as the IFEval checker of
``if-verifiable`` describes it ("Answer with less than 25 words.", "Your entire response
should be in English, and in all lowercase letters. ..."). The gold score of a response is
the fraction of its constraints met, strict mode (IFEval's instruction-level
``partial_strict``), computed by those checkers; nothing here re-implements a check.

Splits: ``train`` and ``heldout`` use disjoint task templates and disjoint topics (keyword
constraints draw their words from the topic, so those differ too); the constraint kinds
and phrasings are shared, as in IFEval. Generation is deterministic in (split, n, seed).

The constraint spec is recovered from the prompt text itself (`parse_constraints`): each
kind's checker description is matched by a regular expression, so a scorer needs nothing
but the chat messages, which is what the ``rule`` reward backend passes:

    reward.backend=rule reward.callable=tasks.ifeval_task:score

Checkers that need NLTK's punkt data (sentence counts) are not used: it cannot be
downloaded here. Word counts use NLTK's regexp tokenizer (no data files). The lowercase /
capital checkers call ``langdetect``, whose seed is fixed below so scores are deterministic.

    python -m tasks.ifeval_task --split heldout -n 5    # show prompts
    python -m tasks.ifeval_pairs --help                 # offline pairs (vLLM)
    python -m tasks.ifeval_eval --help                  # gold score of a checkpoint (vLLM)
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

SPLITS = ("train", "heldout")

# Task templates: disjoint between the splits.
TEMPLATES = {
    "train": (
        "Write a short paragraph about {topic}.",
        "Explain {topic} to a ten-year-old.",
        "Give some practical advice about {topic}.",
        "Describe {topic} in a few sentences.",
        "Write a short note to a friend about {topic}.",
        "Tell me why {topic} matters.",
    ),
    "heldout": (
        "Write a brief product description for something related to {topic}.",
        "Summarise what a beginner should know about {topic}.",
        "Write a short diary entry about {topic}.",
        "Give a quick overview of {topic} for a newsletter.",
    ),
}

# Topics (with words a response about them would naturally use): disjoint between splits.
TOPICS = {
    "train": {
        "gardening": ("plant", "soil", "water", "seeds", "garden"),
        "the ocean": ("waves", "salt", "fish", "tide", "beach"),
        "coffee": ("bean", "cup", "morning", "roast", "flavor"),
        "bicycles": ("wheel", "pedal", "ride", "helmet", "road"),
        "libraries": ("book", "quiet", "shelf", "reading", "library"),
        "rainy days": ("cloud", "umbrella", "wet", "storm", "rain"),
        "learning the piano": ("keys", "practice", "music", "notes", "teacher"),
        "cooking pasta": ("boil", "sauce", "salt", "kitchen", "noodles"),
        "winter": ("snow", "cold", "scarf", "ice", "warm"),
        "dogs": ("walk", "bark", "loyal", "pet", "tail"),
        "the moon": ("night", "orbit", "light", "craters", "sky"),
        "trains": ("station", "track", "ticket", "travel", "speed"),
        "chess": ("board", "king", "move", "strategy", "game"),
        "baking bread": ("flour", "dough", "oven", "yeast", "crust"),
        "mountains": ("peak", "climb", "trail", "rock", "view"),
        "recycling": ("plastic", "waste", "bin", "paper", "reuse"),
    },
    "heldout": {
        "volcanoes": ("lava", "ash", "eruption", "crater", "heat"),
        "honey bees": ("hive", "pollen", "queen", "nectar", "flowers"),
        "public parks": ("trees", "bench", "grass", "city", "picnic"),
        "kites": ("wind", "string", "fly", "colors", "sky"),
        "photography": ("camera", "light", "photo", "lens", "picture"),
        "tea": ("leaves", "cup", "hot", "green", "drink"),
        "deserts": ("sand", "dry", "dunes", "sun", "cactus"),
        "birthdays": ("cake", "party", "gift", "candles", "friends"),
    },
}

FORBIDDEN_POOL = ("very", "really", "good", "great", "many", "also", "important", "things")
END_PHRASES = ("Is there anything else I can help with?", "Any other questions?", "Have a nice day.")


@dataclass(frozen=True)
class Kind:
    """One IFEval instruction: its checker id, how to draw its kwargs, how to find it in text.

    Attributes:
        id: The instruction id in ``if_verifiable.ifeval.instructions_registry``.
        draw: (rng, topic keywords) -> kwargs of the checker's ``build_description``.
        pattern: Regex matching the checker's description (None: the fixed description).
        from_match: Match groups -> kwargs (for kinds with a pattern).
    """

    id: str
    draw: Callable[[random.Random, Sequence[str]], dict[str, Any]] = lambda rng, kw: {}
    pattern: str | None = None
    from_match: Callable[[tuple[str, ...]], dict[str, Any]] = lambda g: {}


def _words_list(text: str) -> list[str]:
    return list(ast.literal_eval(text))


KINDS: dict[str, Kind] = {k.id: k for k in (
    Kind("keywords:existence",
         lambda rng, kw: {"keywords": sorted(rng.sample(list(kw), 2))},
         r"Include keywords (\[[^\]]*\]) in the response\.",
         lambda g: {"keywords": _words_list(g[0])}),
    Kind("keywords:forbidden_words",
         lambda rng, kw: {"forbidden_words": sorted(rng.sample(FORBIDDEN_POOL, 2))},
         r"Do not include keywords (\[[^\]]*\]) in the response\.",
         lambda g: {"forbidden_words": _words_list(g[0])}),
    Kind("length_constraints:number_words",
         lambda rng, kw: rng.choice([{"relation": "less than", "num_words": n} for n in (20, 25, 30)]
                                    + [{"relation": "at least", "num_words": n} for n in (15, 20)]),
         r"Answer with (less than|at least) (\d+) words\.",
         lambda g: {"relation": g[0], "num_words": int(g[1])}),
    Kind("detectable_format:number_bullet_lists",
         lambda rng, kw: {"num_bullets": rng.choice((2, 3))},
         r"Your answer must contain exactly (\d+) bullet points\.",
         lambda g: {"num_bullets": int(g[0])}),
    Kind("detectable_format:number_highlighted_sections",
         lambda rng, kw: {"num_highlights": rng.choice((1, 2))},
         r"Highlight at least (\d+) sections in your answer with markdown",
         lambda g: {"num_highlights": int(g[0])}),
    Kind("startend:end_checker",
         lambda rng, kw: {"end_phrase": rng.choice(END_PHRASES)},
         r"Finish your response with this exact phrase (.+?)\. No other words should follow",
         lambda g: {"end_phrase": g[0]}),
    Kind("detectable_content:postscript",
         lambda rng, kw: {"postscript_marker": "P.S."},
         r"please explicitly add a postscript starting with (P\.P\.S|P\.S\.)",
         lambda g: {"postscript_marker": g[0]}),
    Kind("change_case:english_lowercase"),
    Kind("change_case:english_capital"),
    Kind("detectable_format:json_format"),
    Kind("punctuation:no_comma"),
    Kind("detectable_format:title"),
    Kind("startend:quotation"),
)}

# Pairs that cannot both hold (beyond if-verifiable's own conflict table).
_EXTRA_CONFLICTS = {
    frozenset({"change_case:english_lowercase", "change_case:english_capital"}),
    # a highlight at the start of a line reads as a bullet, and bullets' stars as highlights
    frozenset({"detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"}),
}


@dataclass(frozen=True)
class Constraint:
    """One instruction of a prompt: checker id + the kwargs of its description."""

    id: str
    kwargs: tuple[tuple[str, Any], ...]

    def args(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs}

    def description(self) -> str:
        """The checker's own description (what the prompt says)."""
        return _checker(self.id, self.args()).build_description(**self.args())


def _constraint(cid: str, kwargs: dict[str, Any]) -> Constraint:
    return Constraint(cid, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                        for k, v in kwargs.items())))


@dataclass(frozen=True)
class TaskPrompt:
    """A generated prompt. `text` is the whole user message; `key` is unique per split."""

    key: str
    split: str
    template: str
    topic: str
    constraints: tuple[Constraint, ...]
    text: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "split": self.split, "topic": self.topic, "prompt": self.text,
                "instruction_id_list": [c.id for c in self.constraints],
                "kwargs": [c.args() for c in self.constraints]}


# ----------------------------------------------------------------------------- checkers


@cache
def _registry() -> tuple[dict[str, Any], dict[str, set[str]]]:
    import langdetect
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS, INSTRUCTION_DICT

    langdetect.DetectorFactory.seed = 0  # langdetect is random unless seeded
    return INSTRUCTION_DICT, INSTRUCTION_CONFLICTS


def _checker(cid: str, kwargs: dict[str, Any]) -> Any:
    registry, _ = _registry()
    if cid not in registry:
        raise ValueError(f"unknown IFEval instruction id {cid!r}")
    return registry[cid](cid)


def conflicts(a: str, b: str) -> bool:
    """Whether instructions `a` and `b` cannot be asked together."""
    _, table = _registry()
    return (a == b or b in table.get(a, set()) or a in table.get(b, set())
            or frozenset({a, b}) in _EXTRA_CONFLICTS)


def gold_details(constraints: Sequence[Constraint], response: str, prompt: str = "") -> list[bool]:
    """Strict pass/fail of each constraint, by the if-verifiable IFEval checkers."""
    from if_verifiable.common import evaluate_instructions

    registry, _ = _registry()
    results, _scores = evaluate_instructions(
        response=response, instruction_id_list=[c.id for c in constraints],
        kwargs_list=[c.args() for c in constraints], prompt=prompt, instruction_registry=registry)
    if not results:  # an empty response: nothing passes
        return [False] * len(constraints)
    return [r.strict_pass for r in results]


def gold_score(constraints: Sequence[Constraint], response: str, prompt: str = "") -> float:
    """Fraction of constraints met (IFEval instruction-level strict accuracy of one prompt)."""
    passed = gold_details(constraints, response, prompt)
    return sum(passed) / len(passed)


def parse_constraints(text: str) -> tuple[Constraint, ...]:
    """The constraints stated in a prompt, recovered from their checker descriptions."""
    found: list[tuple[int, Constraint]] = []
    for kind in KINDS.values():
        if kind.pattern is None:
            fixed = _fixed_description(kind.id)
            at = text.find(fixed)
            if at >= 0:
                found.append((at, _constraint(kind.id, {})))
            continue
        for m in re.finditer(kind.pattern, text):
            found.append((m.start(), _constraint(kind.id, kind.from_match(m.groups()))))
    return tuple(c for _, c in sorted(found, key=lambda x: x[0]))


@cache
def _fixed_description(cid: str) -> str:
    return _checker(cid, {}).build_description()


def _last_user(messages: Sequence[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("the prompt has no user message")
    return users[-1]


def score(messages: Sequence[dict[str, str]], response: str) -> float:
    """Rule reward: the gold score of `response` to the task prompt in `messages`.

    Raises:
        ValueError: If the prompt states no constraint this task knows (not an IFEval-task
            prompt: the wrong data set for this reward).
    """
    text = _last_user(messages)
    constraints = parse_constraints(text)
    if not constraints:
        raise ValueError(f"no IFEval-task constraint found in the prompt {text[:120]!r}; "
                         "this reward scores prompts made by tasks.ifeval_task")
    return gold_score(constraints, response, text)


# ----------------------------------------------------------------------------- prompts


def _draw_constraints(rng: random.Random, keywords: Sequence[str]) -> tuple[Constraint, ...]:
    count = rng.choice((1, 2, 2))
    ids: list[str] = []
    while len(ids) < count:
        cid = rng.choice(sorted(KINDS))
        if all(not conflicts(cid, other) for other in ids):
            ids.append(cid)
    return tuple(_constraint(cid, KINDS[cid].draw(rng, keywords)) for cid in ids)


def make_prompts(split: str, n: int, seed: int = 0) -> list[TaskPrompt]:
    """`n` distinct prompts of `split`, the same for the same (split, n, seed).

    Prompt i does not depend on `n` (a longer list extends a shorter one).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    rng = random.Random(f"ifeval-task:{split}:{seed}")
    topics = TOPICS[split]
    out: list[TaskPrompt] = []
    seen: set[str] = set()
    while len(out) < n:
        template = rng.choice(TEMPLATES[split])
        topic = rng.choice(sorted(topics))
        constraints = _draw_constraints(rng, topics[topic])
        text = " ".join([template.format(topic=topic)] + [c.description() for c in constraints])
        if text in seen:
            continue
        seen.add(text)
        out.append(TaskPrompt(f"{split}-{seed}-{len(out)}", split, template, topic, constraints, text))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: print generated prompts as JSON lines."""
    parser = argparse.ArgumentParser(prog="python -m tasks.ifeval_task",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="offline pairs: python -m tasks.ifeval_pairs --help; "
                                            "evaluation: python -m tasks.ifeval_eval --help")
    parser.add_argument("--split", default="train", choices=SPLITS)
    parser.add_argument("-n", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for p in make_prompts(args.split, args.n, args.seed):
        print(json.dumps(p.to_json()))
    return 0

if __name__ == "__main__":
    sys.exit(main())
