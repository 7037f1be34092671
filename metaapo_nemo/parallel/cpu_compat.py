"""CPU shims for megatron-core (active only when CUDA is absent).

megatron-core calls CUDA APIs unconditionally in a few places that are otherwise
device-agnostic (schedules, optimisers, RNG tracker, grad clipping). Each patch below
is the smallest change measured to be necessary on torch 2.13.0+cpu with megatron-core
0.16.1 (see ../shared/notes/megatron-on-cpu.md). On a machine with CUDA, `install()`
does nothing, so the GPU path runs megatron unmodified.

Everything here is process-global by nature (torch functions are module attributes);
`install()` is idempotent and is called only by `metaapo_nemo.parallel.state`.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False
_MODE: "_CudaToCpuMode | None" = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):  # megatron passes torch.cuda.current_device() as a device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Maps `device="cuda"`, `.cuda()` and `pin_memory=True` to plain CPU tensors.

    megatron's schedules, optimisers and grad-norm code create small bookkeeping
    tensors on "cuda" (e.g. `torch.zeros([], device="cuda")` for token counts). The
    mode rewrites those arguments; it leaves every other call untouched.
    `Tensor.type()` is reported with a `torch.cuda.` prefix for callers inside megatron
    only, because its optimisers dispatch on `param.type() == 'torch.cuda.FloatTensor'`.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            out = func(*args)
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("megatron.") and out.startswith("torch.") and ".cuda." not in out:
                return "torch.cuda." + out[len("torch."):]
            return out
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class NullStream:
    """Stand-in for torch.cuda.Stream / current_stream: work is synchronous on CPU."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> "NullEvent":
        return NullEvent()  # the MoE all-to-all dispatcher synchronises on it

    def __enter__(self) -> "NullStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


class NullEvent:
    """Stand-in for torch.cuda.Event: already complete on CPU."""

    def synchronize(self) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def query(self) -> bool:
        return True


def _cpu_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def quiet_expected_warnings() -> None:
    """Silences megatron's import-time notices that are expected on a CPU machine.

    Without TE/Apex megatron falls back to torch optimisers and norms (what we want on
    CPU) and says so once per module; the notices bury real warnings in every log.
    """
    for msg in ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "Transformer Engine is not installed", "full scope is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{msg}.*")


def _all_to_all_single_with_list_splits(original):
    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        def as_list(sizes):
            return sizes.tolist() if hasattr(sizes, "tolist") else sizes

        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *args, **kwargs)

    all_to_all_single._splits_as_lists = True  # type: ignore[attr-defined]
    return all_to_all_single


# gloo has no reduce-scatter and gathers equal shapes only. Sequence parallelism (and the MoE
# dispatcher under it) reduce-scatters activations onto the sequence shards and gathers
# uneven token counts back; on CPU these stand-ins do the same through all-reduce and
# padded all-gather. Exact: a sum all-reduced then sliced is the reduce-scatter's sum.
def _reduce_scatter_tensor(output, input, op=None, group=None, async_op=False):
    import torch.distributed as dist

    full = input.contiguous().clone()
    dist.all_reduce(full, op=dist.ReduceOp.SUM if op is None else op, group=group)
    output.copy_(full.chunk(dist.get_world_size(group))[dist.get_rank(group)])


def _reduce_scatter_list(output, input_list, op=None, group=None, async_op=False):
    import torch.distributed as dist

    full = torch.cat([t.reshape(-1) for t in input_list])
    dist.all_reduce(full, op=dist.ReduceOp.SUM if op is None else op, group=group)
    rank = dist.get_rank(group)
    start = sum(t.numel() for t in input_list[:rank])
    output.copy_(full[start:start + input_list[rank].numel()].view_as(output))


def _uneven_all_gather(original):
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if async_op or all(t.shape == tensor.shape for t in tensor_list):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(t.shape[0] for t in tensor_list)  # uneven along dim 0: pad, gather, trim
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in tensor_list]
        original(parts, padded, group=group)
        for out, part in zip(tensor_list, parts):
            out.copy_(part[: out.shape[0]])
        return None

    all_gather._uneven = True  # type: ignore[attr-defined]
    return all_gather


def install() -> bool:
    """Installs the shims if CUDA is unavailable. Returns True if they are active."""
    global _INSTALLED, _MODE
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    quiet_expected_warnings()

    # RoPE moves inv_freq to torch.cuda.current_device() on EVERY forward, and buffers are
    # created there: answer with the CPU device itself, so those calls need no rewriting
    # (the model forward then runs outside the TorchFunctionMode, see `suspended`).
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    # The RNG tracker (used by the local attention even with dropout 0) forks CUDA RNG
    # state; back it with the CPU generator.
    torch.cuda.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = _set_cpu_rng_state  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
    torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
    torch.cuda.random.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
    # Grad sync / p2p code waits on streams; synchronous on CPU.
    torch.cuda.current_stream = lambda *a, **k: NullStream()  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: NullStream()  # type: ignore[assignment]
    torch.cuda.Stream = NullStream  # type: ignore[assignment,misc]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]

    # megatron's MoE all-to-all passes its split sizes as the tensors it meant to move to the
    # host (already there on CPU: left as tensors), which torch's binding refuses: as lists.
    import torch.distributed as dist

    if not getattr(dist.all_to_all_single, "_splits_as_lists", False):
        dist.all_to_all_single = _all_to_all_single_with_list_splits(dist.all_to_all_single)

    # sequence parallelism over gloo (see `_reduce_scatter_tensor`)
    from megatron.core.tensor_parallel import mappings

    mappings.dist_reduce_scatter_func = _reduce_scatter_tensor
    dist.reduce_scatter = _reduce_scatter_list  # type: ignore[assignment]
    if not getattr(dist.all_gather, "_uneven", False):
        dist.all_gather = _uneven_all_gather(dist.all_gather)  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # stays on the mode stack for the life of the process
    _INSTALLED = True
    return True


def active() -> bool:
    """Whether the CPU shims are installed in this process."""
    return _INSTALLED


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Takes the CUDA->CPU TorchFunctionMode off the stack for a block of non-megatron code.

    The mode intercepts every torch call in the process; vLLM's in-process CPU engine runs
    4-7x slower under it (measured: 13k -> 2-3k tokens/s on the tiny model), and needs none
    of its rewrites. The rollout backend wraps every engine call in this. No-op when the
    shims are not installed or another mode sits above ours (then nothing is popped).
    """
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    if _MODE is None or not stack or stack[-1] is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()
