"""Mistral through the same converter as Llama/Qwen2: logits parity with HF, exact export."""

from __future__ import annotations

import pytest
import torch

from metaapo_nemo.models.arch import load_arch
from metaapo_nemo.models.convert import export_hf, load_hf_weights
from metaapo_nemo.models.logprobs import token_logprobs
from metaapo_nemo.models.megatron_model import BuildOptions, build_gpt_chunks, causal_mask
from tests.dist_utils import build_mistral_checkpoint

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory):
    return build_mistral_checkpoint(tmp_path_factory.mktemp("mistral") / "ckpt", vocab_size=131)


def test_mistral_logits_and_logprobs_match_hf(tiny_mistral, single_ctx, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    arch = load_arch(tiny_mistral)
    assert (arch.model_type, arch.num_kv_heads, arch.qkv_bias) == ("mistral", 2, False)
    chunks = build_gpt_chunks(arch, single_ctx, BuildOptions())
    load_hf_weights(chunks, tiny_mistral, arch, single_ctx)
    torch.manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (3, 40))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_mistral), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(ids).logits
        got = chunks[0].eval()(ids, torch.arange(40).expand(3, 40), causal_mask(40, ids.device))
    assert got.shape == want.shape == (3, 40, 131)
    assert (got - want).abs().max().item() < 1e-5
    lp = token_logprobs(got[:, :-1], ids[:, 1:], arch.vocab_size, single_ctx)
    ref = torch.log_softmax(want[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    assert (lp - ref).abs().max().item() < 1e-5

    out = export_hf(chunks, arch, single_ctx, tiny_mistral, tmp_path / "export")
    src = load_file(str(tiny_mistral / "model.safetensors"))
    dst = load_file(str(out / "model.safetensors"))
    assert src.keys() == dst.keys()
    assert all(torch.equal(src[k], dst[k]) for k in src)
