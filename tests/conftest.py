"""Shared fixtures: tiny HF checkpoints built locally (never downloaded), parallel context."""

from __future__ import annotations

import os

import pytest

# Keep the CPU tier deterministic and polite on 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


def _tiny(cache, arch: str):
    from metaapo_nemo.models.tiny import TinyModelSpec, ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(TinyModelSpec(arch=arch), cache)


@pytest.fixture(scope="session")
def tiny_llama(tiny_cache):
    return _tiny(tiny_cache, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_cache):
    return _tiny(tiny_cache, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_cache):
    return _tiny(tiny_cache, "qwen3")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tiny_cache):
    return _tiny(tiny_cache, "qwen3_moe")


@pytest.fixture
def single_ctx():
    """A single-process gloo group with megatron's parallel state; torn down afterwards."""
    from metaapo_nemo.parallel import state

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(var, None)
    ctx = state.initialize(seed=1234)
    yield ctx
    state.destroy()
