"""A synthetic alignment task with a computable gold reward ("ordered recall").

The user names 2-4 items and a direction; the ideal answer lists exactly those items in
that order (``forward``) or reversed (``reverse``), comma separated, then ``done``::

    user:      reverse : owl lamp river
    assistant: river , lamp , owl done

`gold_score` grades any answer (it is the "human preference" the benchmark measures):

- +1 per requested item present, +1 per adjacent requested pair in the right order,
  +0.5 if the answer ends with ``done``;
- -0.5 per other word (a wrong item, a repeat, chatter), ``,`` excluded;
- divided by the maximum (``2n - 0.5`` for n items), so a perfect answer scores 1.0 and
  bad answers go below 0.

Responses come from noisy rule "demonstrators" (`demonstrate`): the ideal answer with
0-3 corruptions (drop an item, swap two, wrong direction, a distractor item, a repeat, no
``done``, trailing chatter). Two corruption PROFILES exist:

- ``sft``: the demonstrations the SFT policy imitates (30% clean, mostly drops, swaps and
  direction errors);
- ``behaviour``: a different policy that wrote the OFFLINE preference pairs (20% clean,
  mostly distractors, repeats and chatter), so the offline data are off-policy for the
  SFT model, as in the paper.

Everything is deterministic in its seed and uses private ``random.Random`` objects.
`score` has the rule-reward signature (``reward.backend=rule``,
``reward.callable=tasks.toy_alignment:score``).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

ITEMS: tuple[str, ...] = (
    "apple", "bread", "river", "stone", "cloud", "lamp", "chair", "book", "owl", "fox",
    "tiger", "horse", "piano", "violin", "drum", "rose", "tulip", "oak", "pine", "maple",
    "ship", "train", "plane", "car", "bike", "moon", "star", "sun", "rain", "snow",
    "salt", "sugar", "milk", "tea", "coffee", "cheese", "garden", "bridge", "tower", "castle",
    "key", "door", "window", "clock", "mirror", "candle", "ring", "coin", "map", "pen",
    "shell", "wave", "sand", "island", "forest", "valley", "hill", "lake", "field", "road",
    "cat", "dog", "bird", "fish", "frog", "bear", "wolf", "deer", "mouse", "lion",
    "red", "blue", "green", "gold", "silver", "iron", "glass", "paper", "wood", "wool",
)
CHATTER: tuple[str, ...] = ("ok", "so", "well", "maybe", "then", "also", "and", "more", "yes", "hmm")
DIRECTIONS = ("forward", "reverse")
END = "done"
_PROMPT = re.compile(r"(forward|reverse) : ([a-z ]+)")
_WORD = re.compile(r"[a-z]+")

CORRUPTIONS = ("drop", "swap", "direction", "distractor", "repeat", "no_end", "chatter")


@dataclass(frozen=True)
class Profile:
    """A noisy demonstrator: P(clean answer), P(1/2/3 corruptions), corruption weights."""

    p_clean: float
    n_weights: tuple[float, float, float]
    weights: dict[str, float]


PROFILES: dict[str, Profile] = {
    "sft": Profile(0.30, (0.5, 0.35, 0.15),
                   {"drop": 2, "swap": 2, "direction": 2, "distractor": 1, "repeat": 1, "no_end": 1,
                    "chatter": 1}),
    "behaviour": Profile(0.20, (0.45, 0.35, 0.20),
                         {"drop": 1, "swap": 1, "direction": 1, "distractor": 3, "repeat": 2,
                          "no_end": 2, "chatter": 3}),
}


@dataclass(frozen=True)
class Prompt:
    direction: str
    items: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.direction} : {' '.join(self.items)}"

    @property
    def target(self) -> tuple[str, ...]:
        return self.items if self.direction == "forward" else tuple(reversed(self.items))

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def make_prompts(n: int, seed: int, exclude: set[str] | None = None) -> list[Prompt]:
    """``n`` distinct prompts (2-4 distinct items, random direction), none in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Prompt] = []
    while len(out) < n:
        p = Prompt(rng.choice(DIRECTIONS), tuple(rng.sample(ITEMS, rng.choice((2, 3, 3, 4)))))
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


HELDOUT_POOL = 1000  # held-out prompts of the evidence study; its training splits exclude them
HELDOUT_SEED = 4000


def heldout_pool() -> list[Prompt]:
    """The fixed held-out pool (`tasks.toy_eval` reads ranges of it; training prompts exclude it)."""
    return make_prompts(HELDOUT_POOL, HELDOUT_SEED)


def parse_prompt(text: str) -> Prompt | None:
    m = _PROMPT.search(text)
    if m is None:
        return None
    return Prompt(m.group(1), tuple(m.group(2).split()))


def render(words: Sequence[str]) -> str:
    """Items joined by ' , ' with the end marker and chatter kept as separate words."""
    out: list[str] = []
    for w in words:
        if out and w in ITEMS and out[-1] in ITEMS:
            out.append(",")
        out.append(w)
    return " ".join(out)


def gold_score(prompt: Prompt, response: str) -> float:
    """The graded gold reward in (-inf, 1]; 1.0 = the ideal answer (see module docstring)."""
    words = _WORD.findall(response.lower())
    target = prompt.target
    first: dict[str, int] = {}
    penalties = 0
    for i, w in enumerate(words):
        if w in target and w not in first:
            first[w] = i
        elif not (w == END and i == len(words) - 1):
            penalties += 1
    score = float(len(first))
    score += sum(1.0 for a, b in zip(target, target[1:]) if a in first and b in first and first[a] < first[b])
    score += 0.5 if words and words[-1] == END else 0.0
    score -= 0.5 * penalties
    return score / (2 * len(target) - 0.5)


def score(messages: Sequence[dict[str, str]], response: str) -> float:
    """Rule-reward signature: the gold score of ``response`` to the last user message."""
    users = [m["content"] for m in messages if m.get("role") == "user"]
    prompt = parse_prompt(users[-1] if users else "")
    return gold_score(prompt, response) if prompt is not None else 0.0


def _corrupt(words: list[str], kind: str, prompt: Prompt, rng: random.Random) -> list[str]:
    items = [w for w in words if w != END]
    end = [END] if words and words[-1] == END else []
    if kind == "drop" and len(items) > 1:
        items.pop(rng.randrange(len(items)))
    elif kind == "swap" and len(items) > 1:
        i = rng.randrange(len(items) - 1)
        items[i], items[i + 1] = items[i + 1], items[i]
    elif kind == "direction":
        items = items[::-1]
    elif kind == "distractor":
        others = [w for w in ITEMS if w not in prompt.items]
        items.insert(rng.randrange(len(items) + 1), rng.choice(others))
    elif kind == "repeat" and items:
        i = rng.randrange(len(items))
        items.insert(i + 1, items[i])
    elif kind == "no_end":
        end = []
    elif kind == "chatter":
        items += [rng.choice(CHATTER) for _ in range(rng.randint(1, 3))]
    return items + end


def demonstrate(prompt: Prompt, profile: str, rng: random.Random) -> str:
    """One answer from a noisy demonstrator (``profile`` in `PROFILES`)."""
    prof = PROFILES[profile]
    words = list(prompt.target) + [END]
    if rng.random() >= prof.p_clean:
        n = rng.choices((1, 2, 3), weights=prof.n_weights)[0]
        kinds = rng.choices(list(prof.weights), weights=list(prof.weights.values()), k=n)
        for kind in kinds:
            words = _corrupt(words, kind, prompt, rng)
    return render(words)


def preference_pair(prompt: Prompt, profile: str, rng: random.Random, tries: int = 20
                    ) -> tuple[str, str, float, float] | None:
    """Two demonstrator answers with different gold scores: (chosen, rejected, s_c, s_r)."""
    for _ in range(tries):
        a, b = demonstrate(prompt, profile, rng), demonstrate(prompt, profile, rng)
        sa, sb = gold_score(prompt, a), gold_score(prompt, b)
        if sa != sb:
            return (a, b, sa, sb) if sa > sb else (b, a, sb, sa)
    return None


def preference_rows(prompts: Sequence[Prompt], profile: str, seed: int) -> list[dict]:
    """UltraFeedback-binarized rows labelled by the gold score (prompts with no pair skipped)."""
    rng = random.Random(seed)
    rows = []
    for p in prompts:
        pair = preference_pair(p, profile, rng)
        if pair is None:
            continue
        chosen, rejected, sc, sr = pair
        msgs = p.messages()
        rows.append({
            "prompt": p.text,
            "prompt_id": hashlib.sha256(p.text.encode()).hexdigest(),
            "chosen": msgs + [{"role": "assistant", "content": chosen}],
            "rejected": msgs + [{"role": "assistant", "content": rejected}],
            "score_chosen": sc,
            "score_rejected": sr,
        })
    return rows


def tokenizer_corpus(seed: int = 0, n: int = 3000) -> list[str]:
    """Texts for the BPE tokenizer: every task word appears often enough to become one token."""
    rng = random.Random(seed)
    words = list(ITEMS) + list(CHATTER) + list(DIRECTIONS) + [END]
    lines = [" ".join(words), " , ".join(words)]
    for p in make_prompts(n, seed + 1):
        lines.append(p.text)
        lines.append(demonstrate(p, rng.choice(("sft", "behaviour")), rng))
    return lines * 2
