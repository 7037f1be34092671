"""vLLM's process groups inside a training job (torch.distributed already initialised).

vLLM keeps its groups in module globals of ``vllm.distributed.parallel_state``, builds them
with ``torch.distributed.new_group`` over torch's whole world (collective calls), shares
them between every engine of the process, and destroys torch's DEFAULT group when an
engine shuts down. Inside a training job all three need care; this module is the one
place that touches those globals:

- `prepare_host_groups`: every rank creates vLLM's groups together, so that on CPU only
  the host rank of each replica builds an engine (it then makes no collective call).
- teardown wrappers: an engine's shutdown keeps the trainer's default group (and, while
  another engine of the process is alive, vLLM's groups too).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

_TRAINER_OWNS_DEFAULT_PG = False  # the engine joined a default group it did not create
_LIVE_ENGINES = 0  # engines of this process using vLLM's (process-wide) groups


def engine_starting() -> None:
    """Call before building an engine: records who owns torch's default group."""
    global _TRAINER_OWNS_DEFAULT_PG
    _protect_default_process_group()
    if _LIVE_ENGINES == 0:  # an existing group was created by the trainer, not by vLLM
        _TRAINER_OWNS_DEFAULT_PG = dist.is_initialized()


def engine_started() -> None:
    global _LIVE_ENGINES
    _LIVE_ENGINES += 1


def engine_stopped() -> None:
    global _LIVE_ENGINES
    _LIVE_ENGINES -= 1


def prepare_host_groups(ctx: Any) -> None:
    """Creates vLLM's process groups on EVERY rank, so that only host ranks build engines.

    vLLM builds its world and TP/PP groups with ``torch.distributed.new_group`` over the
    whole existing world: collective calls every rank must make. Done here together, the
    host's engine then finds them ready and makes no collective call of its own.
    """
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as vps

    global _TRAINER_OWNS_DEFAULT_PG
    _protect_default_process_group()
    _TRAINER_OWNS_DEFAULT_PG = True
    if vps.model_parallel_is_initialized():
        return
    with set_current_vllm_config(VllmConfig()):
        vps.init_distributed_environment(
            world_size=ctx.dims.world_size,
            rank=ctx.rank,
            local_rank=ctx.local_rank,
            backend=ctx.backend,
        )
        vps.initialize_model_parallel(1, 1, backend=ctx.backend)


def release_host_groups() -> None:
    """Drops vLLM's process groups on a rank (the trainer's default group stays)."""
    from vllm.distributed import parallel_state as vps

    _protect_default_process_group()
    vps.destroy_model_parallel()
    vps.destroy_distributed_environment()


def _protect_default_process_group() -> None:
    """Makes vLLM's teardown keep torch's default process group when the trainer owns it.

    vLLM's engine shutdown calls ``destroy_distributed_environment``, which destroys the
    default process group: right for a process vLLM set up, fatal for a training job whose
    groups the engine joined. The wrapper destroys only vLLM's own groups in that case,
    and, if the trainer already tore its groups down (exit), only forgets them.
    """
    from vllm.distributed import parallel_state as vps

    if getattr(vps.destroy_distributed_environment, "_keeps_trainer_pg", False):
        return
    original_env, original_mp = vps.destroy_distributed_environment, vps.destroy_model_parallel

    def forget_groups() -> None:
        for name, value in list(vars(vps).items()):
            if isinstance(value, vps.GroupCoordinator):
                setattr(vps, name, None)

    def destroy_model_parallel() -> None:
        if _LIVE_ENGINES > 0:
            return  # another engine of this process still uses vLLM's groups
        if _TRAINER_OWNS_DEFAULT_PG and not dist.is_initialized():
            forget_groups()  # their communicators died with the trainer's groups
        else:
            original_mp()

    def destroy_distributed_environment() -> None:
        if _LIVE_ENGINES > 0:
            return
        if not _TRAINER_OWNS_DEFAULT_PG:
            return original_env()
        if dist.is_initialized() and vps._WORLD is not None:
            vps._WORLD.destroy()
        forget_groups()

    destroy_distributed_environment._keeps_trainer_pg = True  # type: ignore[attr-defined]
    vps.destroy_distributed_environment = destroy_distributed_environment
    vps.destroy_model_parallel = destroy_model_parallel
