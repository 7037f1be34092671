"""What every config module shares: the error type, value formatting for messages, and the
strict section base (`extra="forbid"`: a typo fails with the key's name)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A recipe, override or layout that cannot run; the message says what to change."""


def fmt(value: Any) -> str:
    """Format a value the way it would be written in YAML (``true``, ``null``, ``5e-07``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _or_list(values: list[Any]) -> str:
    items = [fmt(v) for v in values]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
