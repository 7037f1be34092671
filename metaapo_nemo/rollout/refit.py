"""Weight refit: HF-named full tensors -> buckets under a memory cap -> `Generator.load_weights`;
or, for a LoRA policy (``lora.refit=adapters``), its adapters alone -> `Generator.load_adapters`.

The tensors come from `metaapo_nemo.models.convert.iter_hf_tensors`, which assembles each HF
tensor from any training layout (TP all-gather inside a stage, PP broadcast across stages,
VPP chunks by global layer number) one tensor at a time, on every rank of a model replica.
This module groups that stream into buckets and hands them to the engine; nothing touches
disk and the engine is never restarted.

Bucket format: a bucket is a list of ``(hf_name, tensor)`` pairs in the stream's order,
whose tensors' bytes sum to at most the cap. Buckets close only between *fusion groups*:
tensors that the engine fuses into one module (q/k/v weights and biases -> ``qkv_proj``,
gate/up -> ``gate_up_proj``) always travel in the same bucket, because vLLM processes
(repacks) a module once all of its inputs arrived within one load call; a module split
across two calls would be processed half-loaded. A fusion group larger than the cap
travels alone in its own bucket (counted in ``RefitStats.oversize_groups``): the stream
already holds that much memory, the cap bounds everything else.

Adapters (`push_adapters`): the stream is `models.lora_peft.iter_adapter_tensors` (PEFT names, full
factors); they are collected whole (a few hundred MB at 70B, r=16) and handed over in one call,
since vLLM registers an adapter as a unit.

Faults: if the engine fails mid-push, the remaining stream is still drained on this rank
(the other ranks are inside the same TP/PP collectives), the engine stays marked stale
and `RefitError` carries the policy step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from metaapo_nemo.rollout.generator import Generator, RefitError

_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def fusion_key(hf_name: str) -> str:
    """The engine-side module an HF tensor loads into.

    ``model.layers.3.self_attn.k_proj.bias`` -> ``model.layers.3.self_attn.qkv_proj``;
    ``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3.mlp.gate_up_proj``;
    ``model.layers.3.mlp.experts.7.down_proj.weight`` -> ``model.layers.3.mlp.experts`` (vLLM's
    fused MoE holds every expert of a layer in one module, re-packed once all are loaded);
    anything else -> its own module (``model.norm``).
    """
    head, sep, _ = hf_name.partition(".mlp.experts.")
    if sep:
        return head + ".mlp.experts"
    module = hf_name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    return f"{parent}.{_FUSED[leaf]}" if leaf in _FUSED else module


@dataclass
class RefitStats:
    """What one push moved, measured on this rank."""

    policy_step: int
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    peak_bucket_bytes: int = 0  # the largest bucket handed to the engine
    cap_bytes: int = 0
    oversize_groups: list[str] = field(default_factory=list)  # fusion groups > cap
    seconds: float = 0.0

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return asdict(self) | {"gb_per_s": self.gb_per_s}


def iter_buckets(
    tensors: Iterable[tuple[str, torch.Tensor]], cap_bytes: int, stats: RefitStats
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups a tensor stream into buckets of whole fusion groups, each <= `cap_bytes`.

    Args:
        tensors: ``(hf_name, tensor)`` pairs; each fusion group must be contiguous.
        cap_bytes: The bucket cap (``rollout.refit_bucket_mb`` MiB).
        stats: Filled in as buckets are produced.

    Raises:
        ValueError: If a fusion group is interrupted by another one (it could be split).
    """
    if cap_bytes <= 0:
        raise ValueError(f"refit bucket cap must be > 0 bytes, got {cap_bytes}")
    stats.cap_bytes = cap_bytes
    bucket: list[tuple[str, torch.Tensor]] = []
    bucket_bytes = 0
    group: list[tuple[str, torch.Tensor]] = []
    key: str | None = None
    closed: set[str] = set()

    def place(group: list[tuple[str, torch.Tensor]], key: str) -> Iterator[list]:
        nonlocal bucket, bucket_bytes
        size = sum(t.numel() * t.element_size() for _, t in group)
        if size > cap_bytes:
            stats.oversize_groups.append(key)
        if bucket and bucket_bytes + size > cap_bytes:
            yield emit()
        bucket.extend(group)
        bucket_bytes += size

    def emit() -> list[tuple[str, torch.Tensor]]:
        nonlocal bucket, bucket_bytes
        out = bucket
        stats.buckets += 1
        stats.peak_bucket_bytes = max(stats.peak_bucket_bytes, bucket_bytes)
        bucket, bucket_bytes = [], 0
        return out

    for name, tensor in tensors:
        stats.tensors += 1
        stats.bytes += tensor.numel() * tensor.element_size()
        k = fusion_key(name)
        if k != key:
            if key is not None:
                closed.add(key)
                yield from place(group, key)
            if k in closed:
                raise ValueError(
                    f"tensor {name} belongs to fusion group {k}, which was interrupted by "
                    "other tensors; the stream must keep q/k/v and gate/up together"
                )
            group, key = [], k
        group.append((name, tensor))
    if key is not None:
        yield from place(group, key)
    if bucket:
        yield emit()


def _attempt(push, kind: str, policy_step: int) -> RefitError | None:
    """Runs one engine push; its failure as a `RefitError` (a backend's own, or one wrapping what a
    backend did not wrap), None on success."""
    try:
        push()
    except RefitError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 (a backend that did not wrap its failure)
        error = RefitError(f"{kind} push for policy step {policy_step} failed: {type(exc).__name__}: {exc}",
                           policy_step)
        error.__cause__ = exc
        return error
    return None


def push_weights(
    tensors: Iterable[tuple[str, torch.Tensor]],
    generator: Generator | None,
    policy_step: int,
    cap_bytes: int,
) -> tuple[RefitStats, RefitError | None]:
    """Streams one full set of weights into `generator` (or only drains the stream).

    Call on every rank that takes part in producing `tensors` (the TP/PP collectives of
    `iter_hf_tensors`); ranks without an engine pass ``generator=None``.

    Args:
        tensors: HF-named full tensors in canonical order.
        generator: This rank's engine, or None.
        policy_step: The optimiser step these weights belong to.
        cap_bytes: Bucket cap in bytes.

    Returns:
        (stats, error): the error is a `RefitError` (engine marked stale) or None. The
        caller decides how to raise it (the SPMD group agrees across ranks first).
    """
    stats = RefitStats(policy_step=policy_step)
    t0 = time.perf_counter()
    stream = iter_buckets(tensors, cap_bytes, stats)
    error: RefitError | None = None
    if generator is not None:
        error = _attempt(lambda: generator.load_weights(stream, policy_step), "weight", policy_step)
    for _ in stream:  # drain: peers are still inside the gather/broadcast collectives
        pass
    stats.seconds = time.perf_counter() - t0
    return stats, error


def push_adapters(
    tensors: Iterable[tuple[str, torch.Tensor]],
    generator: Generator | None,
    config: dict,
    policy_step: int,
) -> tuple[RefitStats, RefitError | None]:
    """Streams a LoRA policy's adapters into `generator` (or only drains the stream).

    Call on every rank that takes part in producing `tensors` (`lora_peft.iter_adapter_tensors`);
    ranks without an engine pass ``generator=None``.

    Args:
        tensors: PEFT-named full adapter factors.
        generator: This rank's engine, or None.
        config: PEFT's adapter config (`lora_peft.peft_config`).
        policy_step: The optimiser step these adapters belong to.

    Returns:
        (stats, error), as `push_weights` (one "bucket": the whole adapter set).
    """
    stats = RefitStats(policy_step=policy_step)
    t0 = time.perf_counter()
    adapters: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:  # every rank drains: peers are inside the gather/broadcast collectives
        stats.tensors += 1
        stats.bytes += tensor.numel() * tensor.element_size()
        if generator is not None:
            adapters[name] = tensor
    stats.buckets, stats.peak_bucket_bytes = 1, stats.bytes
    error: RefitError | None = None
    if generator is not None:
        error = _attempt(lambda: generator.load_adapters(adapters, config, policy_step), "adapter", policy_step)
    stats.seconds = time.perf_counter() - t0
    return stats, error
