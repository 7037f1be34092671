"""A rule-based scorer for the bundled toy preference data (`tasks.toy_prefs`).

Use it as ``reward.backend=rule reward.callable=tasks.toy_rules:score``.
It reads the last user message, recognises the four toy themes and rewards what the toy
data's chosen answers do (and penalises what its rejected ones do):

- arithmetic ("What is 3 + 4?"): +2 if the last number in the answer is the value, -1 if
  it is another number, -0.5 if there is none;
- lists ("List three colours."): +2/3 per distinct correct item (at most 3), -0.5 per item
  of another list, -0.5 if fewer than three correct;
- a sentence about a topic: +1 if the topic word appears, +0.5 for exactly one sentence;
- capitals ("What is the capital of Peru?"): +2 for the right city, -1 for another capital.

Every answer also loses 0.02 per word beyond 30 (the rejected answers ramble). Unknown
prompts score 0 (minus the length penalty). Scores are deterministic floats.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tasks.toy_prefs import _CAPITALS, _LISTS, _TOPICS

_ARITH = re.compile(r"What is (-?\d+) ([+\-*]) (-?\d+)\?")
_LIST = re.compile(r"(?:List|Name) three (\w+)")
_TOPIC = re.compile(r"sentence about (.+?)\.")
_CAPITAL = re.compile(r"capital of (\w+)\?")
_NUMBER = re.compile(r"-?\d+")
_WORD = re.compile(r"[A-Za-z]+")


def _prompt(messages: Sequence[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def _arithmetic(a: str, op: str, b: str, response: str) -> float:
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    numbers = _NUMBER.findall(response)
    if not numbers:
        return -0.5
    return 2.0 if int(numbers[-1]) == value else -1.0


def _listing(kind: str, response: str) -> float:
    words = {w.lower() for w in _WORD.findall(response)}
    good = sum(1 for item in _LISTS.get(kind, ()) if item in words)
    other = sum(1 for k, items in _LISTS.items() if k != kind for item in items if item in words)
    score = 2.0 * min(good, 3) / 3 - 0.5 * other
    return score - (0.5 if good < 3 else 0.0)


def _sentence(topic: str, response: str) -> float:
    key = topic.split()[-1].lower().rstrip("s")  # "the sea" -> "sea", "cats" -> "cat"
    score = 1.0 if key in response.lower() else 0.0
    sentences = [s for s in re.split(r"[.!?]+", response) if s.strip()]
    return score + (0.5 if len(sentences) == 1 else 0.0)


def _capital(country: str, response: str) -> float:
    city = _CAPITALS.get(country)
    if city is None:
        return 0.0
    if city in response:
        return 2.0
    return -1.0 if any(c in response for c in _CAPITALS.values()) else 0.0


def score(messages: Sequence[dict[str, str]], response: str) -> float:
    """The toy reward of `response` to the chat `messages` (higher is better)."""
    prompt = _prompt(messages)
    value = 0.0
    if m := _ARITH.search(prompt):
        value = _arithmetic(*m.groups(), response)
    elif m := _LIST.search(prompt):
        value = _listing(m.group(1), response)
    elif (m := _TOPIC.search(prompt)) and m.group(1) in _TOPICS:
        value = _sentence(m.group(1), response)
    elif m := _CAPITAL.search(prompt):
        value = _capital(m.group(1), response)
    words = len(response.split())
    return round(value - 0.02 * max(0, words - 30), 6)
