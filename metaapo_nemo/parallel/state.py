"""The ONE place that initialises torch.distributed and `megatron.core.parallel_state`.

Everything else receives a `ParallelContext` (ranks, groups, device) explicitly instead of
reaching into megatron's globals. Backend: gloo on CPU, NCCL on GPU (or as configured).

Launch: `torchrun --nproc-per-node N recipes/dpo.py ...` or `srun` (the usual RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK variables, or SLURM_* ones). With none
set, a single-process group is created on a free local port, so `python recipes/dpo.py`
just works.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from metaapo_nemo.parallel import compat, cpu_compat
from metaapo_nemo.parallel.dims import ParallelDims
from metaapo_nemo.parallel.launch import SLURM_RANK_VARS, export_launch_env, launch_info


@dataclass(frozen=True)
class ParallelContext:
    """What the rest of the code needs to know about the process layout."""

    dims: ParallelDims
    rank: int
    local_rank: int
    device: torch.device
    backend: str
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    # Data parallel group WITHOUT the context-parallel ranks: data shards, loss/metric and
    # meta-learner reductions (the CP ranks of a replica hold the same pairs and the same,
    # already CP-reduced, sequence sums). Megatron's DDP and distributed optimiser reduce
    # gradients over data x context parallel ranks themselves.
    dp_group: Any
    dp_group_gloo: Any
    mp_group: Any  # model parallel group (tp x pp) for broadcasting decisions within a replica
    # The pipeline group on gloo, for object collectives (host data such as margins or the
    # meta-learner) that must reach the other stages whatever the training backend is.
    pp_group_gloo: Any = None
    cp_rank: int = 0
    cp_group: Any = None  # context parallel group (the ranks sharing one row's tokens)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the process that logs, writes summaries and exports."""
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env() -> tuple[int, int, int]:
    """Returns (rank, world_size, local_rank) from torchrun or SLURM variables (or 0, 1, 0);
    see `parallel.launch.launch_info`."""
    info = launch_info()
    return info.rank, info.world_size, info.local_rank


def resolve_backend(requested: str) -> str:
    """'auto' -> nccl when CUDA is available, else gloo."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError(
            "parallel.backend=nccl needs CUDA, which this machine does not have; "
            "use parallel.backend=gloo (or auto)"
        )
    return requested


def initialize(
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    cp: int = 1,
    backend: str = "auto",
    seed: int = 1234,
    timeout_minutes: int = 30,
    ep: int = 1,
) -> ParallelContext:
    """Initialises torch.distributed, megatron's parallel_state and its RNG tracker.

    Args:
        tp, pp, vpp, cp: tensor / pipeline / virtual-pipeline / context parallel sizes.
        ep: expert parallel size (MoE; splits the data x context parallel group, expert
            tensor parallel = tp).
        backend: "auto", "gloo" or "nccl".
        seed: base seed for megatron's model-parallel RNG tracker.
        timeout_minutes: collective timeout.

    Returns:
        The ParallelContext of this process.

    Raises:
        ValueError: if the layout does not fit the world size (message shows the arithmetic).
    """
    cpu_compat.install()  # no-op with CUDA
    compat.check_supported()
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    # srun sets no RANK/WORLD_SIZE/LOCAL_RANK: write them (and the rendezvous) for env://
    # and for vLLM's external launcher, which reads os.environ["RANK"] / ["LOCAL_RANK"].
    info = export_launch_env()
    rank, world, local_rank = info.rank, info.world_size, info.local_rank
    dims = ParallelDims(world_size=world, tp=tp, pp=pp, cp=cp, vpp=vpp, ep=ep)
    dims.validate()
    backend = resolve_backend(backend)

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise ValueError(
                    f"WORLD_SIZE={world} but MASTER_PORT is not set; launch with torchrun "
                    "(or srun with slurm/ scripts), which set the rendezvous variables"
                )
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp,
        distributed_timeout_minutes=timeout_minutes,
        **compat.initialize_model_parallel_kwargs(),
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)

    return ParallelContext(
        dims=dims,
        rank=rank,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        dp_group_gloo=compat.data_parallel_group_gloo(with_context_parallel=False),
        mp_group=ps.get_model_parallel_group(),
        pp_group_gloo=pipeline_group_gloo(ps.get_pipeline_model_parallel_group(), backend),
        cp_rank=ps.get_context_parallel_rank(),
        cp_group=ps.get_context_parallel_group(),
    )


def pipeline_group_gloo(pp_group: Any, backend: str, always_new: bool = False) -> Any:
    """A gloo group with the ranks of this rank's pipeline group (the group itself on gloo).

    Every rank must call it (new groups are collective): the pipeline groups' rank lists are
    all-gathered and one gloo group is made per pipeline group, in the same order on every
    rank. Object collectives then use the SAME ranks on every backend; a broadcast over the
    world group with a per-pipeline source (the old NCCL path) could hang or cross streams
    at PP > 1 with DP > 1. `always_new` builds the groups on gloo too (tests of that path).
    """
    if backend == "gloo" and not always_new:
        return pp_group
    mine = dist.get_process_group_ranks(pp_group)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    found = None
    for ranks in sorted({tuple(r) for r in everyone}):
        group = dist.new_group(list(ranks), backend="gloo")
        if dist.get_rank() in ranks:
            found = group
    return found


def destroy() -> None:
    """Tears down megatron's groups and the default process group (tests, clean exit)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                   "GROUP_RANK", "TORCHELASTIC_RUN_ID", *SLURM_RANK_VARS)


def independent_env(**extra: str) -> dict[str, str]:
    """os.environ without the rendezvous variables, plus `extra`: the environment for
    launching a SEPARATE job (subprocess) from a process that initialised torch.distributed.

    A single process sets MASTER_PORT for itself (`initialize`); a child inheriting it would
    try to bind the same port (EADDRINUSE) while the parent's store still holds it.
    """
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(extra)
    return env
