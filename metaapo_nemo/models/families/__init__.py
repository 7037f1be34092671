"""One declarative mapping per model family: what the converter, export and the weight push
need to know of a family (`Family`), one file each; `family_of` finds the one for a
checkpoint's ``model_type``. A new family is one such file (and its tests): its HF <-> Megatron
parameter names and split kinds, and the config rules that shape `ModelArch`.
"""

from __future__ import annotations

from metaapo_nemo.models.families.base import Family
from metaapo_nemo.models.families.llama import FAMILY as LLAMA
from metaapo_nemo.models.families.mistral import FAMILY as MISTRAL
from metaapo_nemo.models.families.qwen2 import FAMILY as QWEN2
from metaapo_nemo.models.families.qwen3 import FAMILY as QWEN3
from metaapo_nemo.models.families.qwen3_moe import FAMILY as QWEN3_MOE

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LLAMA, QWEN2, MISTRAL, QWEN3, QWEN3_MOE)}
SUPPORTED = tuple(FAMILIES)


def family_of(model_type: str | None, source: str = "config") -> Family:
    """The family of an HF ``model_type``.

    Raises:
        ValueError: Naming the model type and the supported ones.
    """
    if model_type not in FAMILIES:
        raise ValueError(f"{source}: model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return FAMILIES[model_type]


__all__ = ["FAMILIES", "SUPPORTED", "Family", "family_of"]
