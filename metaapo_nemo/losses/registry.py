"""Registry of preference losses by name: the one place that maps a config string to a loss.

Callers do `build_loss(cfg.loss.name, **cfg.loss.kwargs)` and then use the returned
`PreferenceLoss`; no caller branches on loss names.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from metaapo_nemo.losses.base import PreferenceLoss
from metaapo_nemo.losses.dpo import DPOLoss
from metaapo_nemo.losses.ipo import IPOLoss
from metaapo_nemo.losses.kto import KTOLoss
from metaapo_nemo.losses.simpo import SimPOLoss

LOSSES: dict[str, type] = {cls.name: cls for cls in (DPOLoss, IPOLoss, KTOLoss, SimPOLoss)}


def loss_params(name: str) -> list[str]:
    """Constructor argument names of the loss registered as `name`."""
    return [f.name for f in fields(_lookup(name))]


def _lookup(name: str) -> type:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_loss(name: str, **kwargs: Any) -> PreferenceLoss:
    """Build a registered loss from its name and hyper-parameters.

    Args:
        name: One of `LOSSES` ("dpo", "ipo", "kto", "simpo").
        **kwargs: Constructor arguments of that loss; omitted ones take its defaults.

    Raises:
        ValueError: for an unknown name, an unknown argument (the message lists the valid
            ones) or an out-of-range value.
    """
    cls = _lookup(name)
    valid = loss_params(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"valid arguments: {', '.join(valid)}"
        )
    return cls(**kwargs)
