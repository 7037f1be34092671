"""megatron's fused softmax is requested only where its CUDA kernel imports (issue 19, finding 7).

The megatron-core wheel does not ship ``scaled_masked_softmax_cuda``: with the flag on, the
local spec's `FusedScaleMaskSoftmax` imports it on the first bf16 attention and raises
ModuleNotFoundError (shown here on CPU), so `train.attention=megatron` without TE on a GPU
would stop at step 1.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from metaapo_nemo.models import megatron_model
from metaapo_nemo.models.arch import arch_from_hf_dict
from metaapo_nemo.models.megatron_model import BuildOptions, transformer_config

ARCH = arch_from_hf_dict(
    {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 64,
    }
)


def _ctx(device: str):
    dims = SimpleNamespace(tp=1, pp=1, vpp=None, cp=1, ep=1)
    return SimpleNamespace(device=torch.device(device), dims=dims)


def test_the_wheel_has_no_fused_softmax_kernel_and_megatron_needs_it():
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType

    megatron_model.fused_softmax_available.cache_clear()
    assert not megatron_model.fused_softmax_available()
    softmax = FusedScaleMaskSoftmax(False, True, AttnMaskType.padding, True, None, True, None)
    scores = torch.zeros(1, 4, 32, 32, dtype=torch.bfloat16)
    mask = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    with pytest.raises(ModuleNotFoundError, match="scaled_masked_softmax_cuda"):
        softmax(scores, mask)


@pytest.mark.parametrize("kernel", [False, True])
def test_flag_follows_the_kernel_on_gpu_and_is_off_on_cpu(monkeypatch, kernel):
    monkeypatch.setattr(megatron_model, "fused_softmax_available", lambda: kernel, raising=False)
    opts = BuildOptions(dtype="bfloat16", transformer_impl="local")
    assert transformer_config(ARCH, _ctx("cuda"), opts).masked_softmax_fusion is kernel
    assert transformer_config(ARCH, _ctx("cpu"), opts).masked_softmax_fusion is False


def test_probe_imports_every_kernel(monkeypatch):
    import importlib

    seen = []

    def fake_import(name):
        seen.append(name)
        if name == "scaled_softmax_cuda":
            raise ImportError(name)
        return object()

    monkeypatch.setattr(importlib, "import_module", fake_import)
    megatron_model.fused_softmax_available.cache_clear()
    try:
        assert megatron_model.fused_softmax_available() is False
        assert seen == list(megatron_model.FUSED_SOFTMAX_KERNELS)
    finally:
        megatron_model.fused_softmax_available.cache_clear()
