"""Megatron-Core version differences, in one place.

CPU CI runs megatron-core 0.16.x (the newest release for Python 3.11); GPU containers run the
newest 0.19.x. Everything in the project that calls a megatron API whose shape changed between
those releases goes through this module; nothing else checks versions. Differences are
detected from the installed API (signatures, attributes) rather than from version numbers,
so a patch release that back-ports a change is handled too; the version itself is reported
(`info()`, the run log) and pinned by a test so that CI says which release it exercised.

Known differences handled here:
- `GPTModel(..., vp_stage=)`: required for interleaved PP from 0.13 on; absent before.
- `finalize_model_grads(model, num_tokens, pg_collection=None, ...)`: extra keyword
  arguments in newer releases; we always pass `num_tokens=None` (our losses are already
  normalised by the global pair count) and forward whatever else the schedule passes.
- `MegatronOptimizer.step()`: returns `(ok, grad_norm, num_zeros)` in 0.16; handled as "a
  tuple whose first two items are ok and grad_norm" or a bare bool.
- Gloo data-parallel groups: created by default by `initialize_model_parallel` in 0.16
  (`create_gloo_process_groups=True`); requested explicitly where the keyword exists and
  read back as None where a release stops creating them.
- Distributed-optimiser load without Apex/TE (torch Adam: CPU, or a GPU container without
  TE): 0.16's `DistributedOptimizer.load_state_dict` gives EVERY parameter's Adam state the
  SAME `step` tensor (`s["step"] = step`, no clone); torch's Adam then increments it once per
  parameter per step, so after a resume the bias correction sees step + n_params, + 2
  n_params, ... and the moments drift (~1e-3 relative after two steps on the tiny model).
  `untie_adam_steps_after_load` gives each parameter its own copy (detected by identity,
  not by version). 0.16's `_set_main_param_and_optimizer_states` on the fully-reshardable
  path also expects a `step` the source lacks: `keep_adam_step_on_reshardable_load`.
- Distributed checkpoints: 0.17+ keep the common (non-sharded) state INSIDE the `.distcp`
  files, as the ShardedObject ``common_state``, and write no ``common.pt``; 0.16 reads only
  ``common.pt``, so it could not load, resume or export a checkpoint written on a cluster.
  `dist_checkpoint_load_kwargs` gives 0.16 a common-state reader that falls back to that
  object (detected by whether megatron's own reader knows the new format). 0.19 reads 0.16's
  ``common.pt`` natively. Checkpoints therefore cross both ways (tests/test_cross_stack.py).
- MoE load-balancing loss under ``calculate_per_token_loss``: the router pre-multiplies its
  loss by a token count (0.16), or by that count x the TP x CP group size (0.19), expecting
  finalize_model_grads to divide by the global token count, which our losses do not ask for;
  `router_loss_token_factor` says which (detected in the router's source). With a padding
  mask (always, here) that count is read after megatron all-reduced the per-expert counts
  IN PLACE over the TP x CP group (`get_tokens_per_expert_and_token_count`, both releases):
  under sequence parallelism it is the valid tokens of the whole group, not of this rank's
  shard (measured on the CPU stand-ins; the layout tests hold it to the single process).
- Frozen linears' backward (`LinearWithFrozenWeight`, every base linear of a LoRA policy): 0.16
  computes ``grad_output.matmul(weight)`` on the 3-D gradient. The output layer's gradient
  arrives as a transposed, non-contiguous view ([s, b, V] of GPTModel's transposed logits), so
  torch.matmul broadcasts the weight and runs s batched GEMMs of b rows: measured on SmolLM2
  (4 x 320 tokens), 2.0 s of a 5.5 s backward in that one call. 0.19 flattens to 2-D first (one
  GEMM). `frozen_linear_dgrad_as_one_gemm` gives 0.16 the same (detected in the source).
- CUDA-only calls inside megatron (streams in 0.19's grad sync, device="cuda" tensors) are
  CPU shims, not version differences: see `cpu_compat`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import re
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

# Oldest release the code runs on, and the newest one it is written against.
MIN_VERSION = (0, 16)
NEWEST_KNOWN = (0, 19)
# The series the two test tiers run: the CPU tier (Python 3.11 tops out at 0.16) and the H100
# stack's tier (constraints-gpu.txt, Python 3.12), both in CI.
TESTED_SERIES = ((0, 16), (0, 19))


@dataclass(frozen=True)
class McoreInfo:
    """What this process's megatron-core is and which API variants it exposes."""

    version: str  # megatron.core.__version__, e.g. "0.16.1"
    version_tuple: tuple[int, int, int]
    gpt_has_vp_stage: bool
    init_has_gloo_flag: bool
    finalize_has_pg_collection: bool

    @property
    def series(self) -> tuple[int, int]:
        return self.version_tuple[:2]

    def describe(self) -> str:
        return (f"megatron-core {self.version} (series {self.series[0]}.{self.series[1]}; "
                f"supported {MIN_VERSION[0]}.{MIN_VERSION[1]} to "
                f"{NEWEST_KNOWN[0]}.{NEWEST_KNOWN[1]})")


def parse_version(text: str) -> tuple[int, int, int]:
    """"0.16.1" / "0.19.0rc2" / "0.17.0.dev0" -> (major, minor, patch); missing parts are 0."""
    nums = [int(a or b) for a, b in re.findall(r"^(\d+)|\.(\d+)", text)][:3]
    return tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


def _has_param(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@cache
def info() -> McoreInfo:
    """Detects the installed megatron-core (imports it; call after `cpu_compat.install`)."""
    import megatron.core as mcore
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel

    # The distribution's own version: 0.19's `__version__` appends `git rev-parse HEAD` of
    # whatever repository its files sit in (a venv inside this checkout reads OUR commit).
    try:
        version = importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH
        version = str(getattr(mcore, "__version__", "0.0.0"))
    return McoreInfo(
        version=version,
        version_tuple=parse_version(version),
        gpt_has_vp_stage=_has_param(GPTModel.__init__, "vp_stage"),
        init_has_gloo_flag=_has_param(ps.initialize_model_parallel, "create_gloo_process_groups"),
        finalize_has_pg_collection=_has_param(finalize_model_grads, "pg_collection"),
    )


def check_supported() -> McoreInfo:
    """Fails on releases older than MIN_VERSION; warns on ones newer than NEWEST_KNOWN."""
    i = info()
    if i.series < MIN_VERSION:
        raise RuntimeError(
            f"{i.describe()}: too old; install megatron-core>={MIN_VERSION[0]}.{MIN_VERSION[1]}"
        )
    if i.series > NEWEST_KNOWN:
        warnings.warn(f"{i.describe()}: newer than any release this code was checked against",
                      stacklevel=2)
    return i


# ---------------------------------------------------------------- call sites that differ


def gpt_model_kwargs(vp_stage: int | None) -> dict[str, Any]:
    """Extra `GPTModel(...)` keywords for this release (the virtual-pipeline stage)."""
    return {"vp_stage": vp_stage} if info().gpt_has_vp_stage else {}


def initialize_model_parallel_kwargs() -> dict[str, Any]:
    """Extra `initialize_model_parallel(...)` keywords: ask for the gloo DP groups."""
    return {"create_gloo_process_groups": True} if info().init_has_gloo_flag else {}


def data_parallel_group_gloo(with_context_parallel: bool = True) -> Any:
    """The gloo data-parallel group, or None where this release did not create one."""
    from megatron.core import parallel_state as ps

    try:
        return ps.get_data_parallel_group_gloo(with_context_parallel=with_context_parallel)
    except (AssertionError, AttributeError, RuntimeError):
        return None


def finalize_grads_without_token_scaling():
    """`config.finalize_model_grads_func` that never rescales by a token count.

    Our losses already divide by the GLOBAL pair count, so megatron must not divide again;
    newer releases pass extra keywords (pg_collection, force_all_reduce), forwarded as is.
    """
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    def finalize(models, num_tokens=None, **kwargs):
        return finalize_model_grads(models, None, **kwargs)

    return finalize


def dist_checkpoint_load_kwargs() -> dict[str, Any]:
    """Extra `dist_checkpointing.load(...)` keywords: none where megatron reads both common-state
    formats itself (0.17+); else a common-state reader that also takes 0.17+'s format."""
    from megatron.core.dist_checkpointing import serialization

    if hasattr(serialization, "_legacy_common_state_exists"):  # 0.17+: reads common.pt and the object
        return {}
    return {"common_strategy": _common_reader_for_both_formats()}


COMMON_STATE_KEY = "common_state"  # 0.17+'s ShardedObject holding the common state


def read_common_state_object(checkpoint_dir: str) -> Any:
    """The common state of a 0.17+ checkpoint, read from its ``common_state`` ShardedObject
    (the same bytes 0.19's own reader takes: a torch-saved list whose first item is the dict)."""
    import io

    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    key = ShardedObject(COMMON_STATE_KEY, None, (1,), (0,)).unique_key
    holder = {key: io.BytesIO()}
    dcp.load(holder, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)), no_dist=True)
    loaded = holder[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


@cache
def _common_reader_for_both_formats() -> Any:
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.common import (
        COMMON_STATE_FNAME,
        TorchCommonLoadStrategy,
    )

    class CommonStateReader(TorchCommonLoadStrategy):
        """megatron's torch common-state reader, plus 0.17+'s format when common.pt is absent."""

        def load_common(self, checkpoint_dir):
            from pathlib import Path

            if (Path(checkpoint_dir) / COMMON_STATE_FNAME).exists():
                return super().load_common(checkpoint_dir)
            from torch.distributed.checkpoint.api import CheckpointException

            try:
                return read_common_state_object(str(checkpoint_dir))
            except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's is a BaseException
                raise CheckpointingException(
                    f"{checkpoint_dir}: neither {COMMON_STATE_FNAME} (megatron-core <= 0.16) nor a "
                    f"'{COMMON_STATE_KEY}' object (0.17+) could be read: {type(exc).__name__}: {exc}"
                ) from exc

    return CommonStateReader()


@functools.lru_cache(maxsize=1)
def _router_scales_by_tp_cp() -> bool:
    from megatron.core.transformer.moe import router

    return "num_local_tokens * self.tp_cp_group.size()" in inspect.getsource(router)


def router_loss_token_factor(group_tokens: int, tp: int, cp: int) -> int:
    """What megatron multiplies a micro-batch's MoE router loss by under
    ``calculate_per_token_loss`` (see the module docstring): divide the loss weight by it.
    ``group_tokens``: the micro-batch's valid (non-padding) tokens over the TP x CP ranks that
    share it (its own under plain TP, where every rank routes them all)."""
    return group_tokens * (tp * cp if _router_scales_by_tp_cp() else 1)


def moe_router_loss_values() -> torch.Tensor | None:
    """Per-layer sums of the MoE load-balancing loss megatron tracked since the last clear
    (unweighted: E x sum_i f_i P_i per micro-batch), or None before any was tracked. 0.19 keeps
    them in `get_moe_metrics_tracker()`, 0.16 in the layer-wise logging dict."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        entry = moe_utils.get_moe_metrics_tracker().metrics.get("load_balancing_loss")
        return None if entry is None else entry.values
    entry = moe_utils.get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    return None if entry is None else entry["values"]


def clear_moe_router_losses() -> None:
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        moe_utils.get_moe_metrics_tracker().clear()
    else:
        moe_utils.clear_aux_losses_tracker()


def forward_backward_func():
    """megatron's schedule for the current layout (no PP, 1F1B, or interleaved 1F1B)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()


def optimizer_step(optimizer) -> tuple[bool, float | None]:
    """Runs `optimizer.step()`; returns (update applied, global grad norm or None)."""
    out = optimizer.step()
    if isinstance(out, tuple):
        ok = bool(out[0])
        norm = out[1] if len(out) > 1 else None
    else:
        ok, norm = bool(out), None
    return ok, None if norm is None else float(norm)


def keep_adam_step_on_reshardable_load(optimizer) -> None:
    """Works around megatron-core 0.16's fully-reshardable distributed-optimiser load on the
    torch-Adam path (no TE/Apex): it copies every Adam state key of a parameter, `step`
    included, from a source that drops `step` (KeyError: 'step'). `load_state_dict` has
    already set `step` from the param groups; feed that value back so the copy is a no-op.
    Applied per instance; other optimisers and versions are left alone.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or getattr(opt, "_keeps_step", False):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _opt=opt, _original=original):
            if "step" not in tensors:
                group, order = _opt.model_param_group_index_map[model_param]
                main = _opt.optimizer.param_groups[group]["params"][order]
                step = _opt.optimizer.state.get(main, {}).get("step")
                if step is not None:
                    tensors = {**tensors, "step": step.clone()}
            return _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        opt._keeps_step = True


def untie_adam_steps_after_load(optimizer) -> int:
    """Gives every parameter its own Adam `step` tensor after a distributed-optimiser load.

    megatron-core 0.16 (torch-Adam path) assigns one shared `step` tensor to all parameters
    on load; torch's Adam increments `state["step"]` in place per parameter, so a shared
    tensor advances n_params times per optimiser step and every later bias correction is
    wrong. Cloning restores the per-parameter counters a fresh optimiser has (same value).
    Returns how many states were untied (0 where nothing was shared).
    """
    untied = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        seen: set[int] = set()
        for state in getattr(inner, "state", {}).values():
            step = state.get("step") if isinstance(state, dict) else None
            if not isinstance(step, torch.Tensor):
                continue
            if id(step) in seen:
                state["step"] = step.clone()
                untied += 1
            seen.add(id(step))
    return untied


def frozen_linear_dgrad_as_one_gemm() -> bool:
    """Makes megatron's frozen-weight linear compute its input gradient as ONE GEMM on the
    flattened gradient (0.19's backward; 0.16's batched the output layer's transposed gradient
    into s small GEMMs). Idempotent; returns whether it changed the installed backward."""
    from megatron.core.tensor_parallel import layers

    cls = layers.LinearWithFrozenWeight
    original = cls.backward
    if getattr(original, "_flattens", False) or "reshape(-1" in inspect.getsource(original):
        return False

    def backward(ctx, grad_output):
        if grad_output.dim() <= 2:
            return original(ctx, grad_output)
        grads = original(ctx, grad_output.reshape(-1, grad_output.size(-1)))
        return (grads[0].reshape(*grad_output.shape[:-1], grads[0].size(-1)), *grads[1:])

    backward._flattens = True  # type: ignore[attr-defined]
    cls.backward = staticmethod(backward)
    return True
