"""Checks that explain themselves: each returns (or raises) the message with the key, the
value, the arithmetic and the fix. ``check_layout`` needs the world size and the model's shape,
so it runs at start-up and in ``--dry-run`` rather than in the schema's validators."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from metaapo_nemo.config.base import ConfigError, _divisors, _or_list
from metaapo_nemo.parallel.dims import ParallelDims


def round_size_error(round_size: int, global_batch_size: int) -> str | None:
    """The message when a MetaAPO round is not whole optimiser steps, else None."""
    R, G = round_size, global_batch_size
    if R % G == 0:
        return None
    fix = f"{G}" if R < G else f"{R - R % G} or {R - R % G + G}"
    return f"metaapo.round_size={R} is not a multiple of train.global_batch_size={G}; use {fix}"


def set_keys(section: BaseModel | None, prefix: str) -> list[str]:
    """The dotted keys a user set in ``section`` (schema order), or [prefix] for an empty
    section that was given; [] for None."""
    if section is None:
        return []
    keys: list[str] = []
    for name in type(section).model_fields:
        if name in section.model_fields_set:
            value = getattr(section, name)
            nested = set_keys(value, f"{prefix}.{name}") if isinstance(value, BaseModel) else []
            keys += nested or [f"{prefix}.{name}"]
    return keys or [prefix]


def _key_list(keys: list[str]) -> str:
    return f"{keys[0]} is a" if len(keys) == 1 else f"{', '.join(keys)} are"


def _context_error(max_length: int, max_pos: int | None, prefix: str = "model.") -> list[str]:
    if max_pos is None or max_length <= max_pos:
        return []
    return [
        f"data.max_length={max_length} exceeds {prefix}max_position_embeddings={max_pos}; "
        f"use data.max_length <= {max_pos}"
    ]


def batch_error(global_batch: int, micro_batch: int, dp: int) -> str | None:
    """Explain why ``global_batch`` does not split into ``micro_batch x dp`` pieces.

    Returns:
        None when ``global_batch % (micro_batch * dp) == 0``, else the error with the fix.
    """
    step = micro_batch * dp
    if global_batch % step == 0:
        return None
    lo = (global_batch // step) * step
    globals_ok = [x for x in (lo, lo + step) if x > 0]
    micros = [m for m in _divisors(global_batch) if global_batch % (m * dp) == 0]
    fix = f", or micro_batch_size {_or_list(micros)}" if micros else ""
    return (
        f"train.global_batch_size={global_batch} is not divisible by "
        f"train.micro_batch_size={micro_batch} x data-parallel size {dp} = {step}; "
        f"use a global batch of {_or_list(globals_ok)}{fix}"
    )


_HF_KEYS = {
    "num_hidden_layers": "num_layers",
    "num_key_value_heads": "num_kv_heads",
}


def check_layout(cfg: Any, world_size: int, model_dims: dict | None = None) -> ParallelDims:
    """Validate what needs the world size and the model's shape; return the layout.

    Args:
        cfg: A validated `config.schema.Config` (not imported here: schema imports this module).
        world_size: Number of ranks (``WORLD_SIZE``).
        model_dims: The model's shape from ``cli.read_model_dims`` (keys ``num_layers``,
            ``num_attention_heads``, ``num_kv_heads``, optionally
            ``max_position_embeddings``; HF names ``num_hidden_layers`` /
            ``num_key_value_heads`` are accepted too), or None to skip shape checks.

    Returns:
        The validated ``ParallelDims``.

    Raises:
        ConfigError: Every problem found, each with the arithmetic and the fix.
    """
    dims_in = {_HF_KEYS.get(k, k): v for k, v in (model_dims or {}).items()}
    p = cfg.parallel
    dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp, ep=p.ep)
    try:
        dims.validate(
            num_layers=dims_in.get("num_layers"),
            num_attention_heads=dims_in.get("num_attention_heads"),
            num_kv_heads=dims_in.get("num_kv_heads"),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    errors = _context_error(cfg.data.max_length, dims_in.get("max_position_embeddings"))
    batch = batch_error(cfg.train.global_batch_size, cfg.train.micro_batch_size, dims.dp)
    if batch:
        errors.append(batch)
    experts = dims_in.get("num_experts") or 0
    if experts and p.tp > 1 and not p.sequence_parallel:
        errors.append(
            f"parallel.tp={p.tp} with a mixture-of-experts model ({experts} experts) needs "
            "parallel.sequence_parallel=true (megatron refuses MoE with tensor parallelism without it); "
            "set parallel.sequence_parallel=true, or parallel.tp=1 with parallel.ep / parallel.pp")
    if p.ep > 1 and (not experts or experts % p.ep):
        errors.append(
            f"parallel.ep={p.ep}: expert parallelism splits each layer's experts over ep ranks, but this model "
            + (f"has {experts} experts, not a multiple of {p.ep}; use parallel.ep dividing {experts}" if experts
               else "has none (a dense model); set parallel.ep=1"))
    if cfg.lora is not None:
        errors += _lora_errors(cfg.lora, dims_in, experts)
    if experts and p.cp > 1:
        errors.append(
            f"parallel.cp={p.cp} with a mixture-of-experts model ({experts} experts): the "
            "router's load-balancing loss is not yet weighted for context-parallel shares of a row; "
            "use parallel.cp=1 (and parallel.tp / parallel.pp, full recompute) for this model")
    if errors:
        raise ConfigError("\n".join(errors))
    return dims


def _lora_errors(lora, dims: dict, experts: int) -> list[str]:
    """LoRA against the model's shape: a rank no larger than each targeted projection's smaller
    dimension (else the update is not low-rank), and no mixture-of-experts model (not built)."""
    if experts:
        return [f"lora with a mixture-of-experts model ({experts} experts): adapters on the experts' linears "
                "are not supported yet; train this model without lora (lora: null)"]
    h, heads, kv, i = (dims.get(k) for k in ("hidden_size", "num_attention_heads", "num_kv_heads",
                                             "intermediate_size"))
    if not (h and heads and kv and i):
        return []
    from metaapo_nemo.models.arch import projection_shapes

    shapes = projection_shapes(h, heads, kv, dims.get("head_dim") or h // heads, i)
    t = min(lora.targets(), key=lambda name: min(shapes[name]))  # the most constraining projection
    if lora.rank <= min(shapes[t]):
        return []
    return [f"lora.rank={lora.rank} > {min(shapes[t])}, the smaller dimension of {t} ({shapes[t][0]} -> "
            f"{shapes[t][1]}): the update would not be low-rank; use lora.rank <= {min(shapes[t])}"]

