"""Memory planner against hand-computed numbers for Llama-3.1-8B and 70B layouts."""

from __future__ import annotations

import pytest

from metaapo_nemo.models.arch import arch_from_hf_dict
from metaapo_nemo.planner import GiB, PlanInput, check_fits, params_per_rank, plan_memory

LLAMA31 = dict(model_type="llama", vocab_size=128256, num_attention_heads=32 // 1, num_key_value_heads=8,
               rope_theta=5e5, max_position_embeddings=131072, tie_word_embeddings=False,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
L8B = arch_from_hf_dict(LLAMA31 | dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336))
L70B = arch_from_hf_dict(LLAMA31 | dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                        num_attention_heads=64))


def test_parameter_counts():
    assert L8B.num_parameters == 8_030_261_248  # the published 8.03 B
    assert L70B.num_parameters == 70_553_706_496  # the published 70.55 B
    # 8B, TP8 PP1: per layer 4096*128*(32+16) + 4096*4096 + 3*4096*14336 + 2*4096 = 218,112,000
    # -> 32 layers / 8 = 872,448,000; embedding and output 128256/8*4096 = 65,667,072 each; norm 4096
    assert params_per_rank(L8B, tp=8, pp=1) == 872_448_000 + 2 * 65_667_072 + 4096


def test_8b_tp8_one_node_hand_computed():
    n = 872_448_000 + 2 * 65_667_072 + 4096
    plan = plan_memory(PlanInput(arch=L8B, tp=8, pp=1, dp=1, dtype="bfloat16", distributed_optimizer=True,
                                 recompute="selective", seq_length=4096, micro_batch_rows=4,
                                 num_microbatches=16, vllm_tp=8, vllm_kv_cache_gib=10.0))
    t = plan.per_phase["train"]
    assert t["weights"] == pytest.approx(2 * n / GiB)
    assert t["grads"] == pytest.approx(4 * n / GiB)
    assert t["optimizer"] == pytest.approx(12 * n / GiB)  # dp = 1: nothing to shard
    # selective: s b h (10 + 24/8) per layer = 4096*4*4096*13 bytes, 32 layers, 1 micro-batch in flight
    assert t["activations"] == pytest.approx(4096 * 4 * 4096 * 13 * 32 / GiB)
    assert t["logits"] == pytest.approx(2 * 4096 * 4 * 16032 * 4 / GiB)
    g = plan.per_phase["generate"]
    assert g["vllm"] == pytest.approx(1.0 + 8_030_261_248 * 2 / 8 / GiB + 10.0)
    assert check_fits(plan, 80.0) is None


def test_70b_tp8_pp4_dp2_with_distributed_optimizer():
    # per layer: 8192*128*(64+16) + 8192*8192 + 3*8192*28672 + 2*8192 = 855,654,400
    per_layer = 8192 * 128 * 80 + 8192 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    assert per_layer == 855_654_400
    layers = 20 * per_layer // 8
    vocab = 16032 * 8192
    n = max(layers + vocab, layers + 8192 + vocab)  # first vs last stage (untied)
    assert params_per_rank(L70B, tp=8, pp=4) == n
    plan = plan_memory(PlanInput(arch=L70B, tp=8, pp=4, dp=2, dtype="bfloat16", distributed_optimizer=True,
                                 recompute="full", seq_length=4096, micro_batch_rows=4, num_microbatches=16,
                                 reference_offloaded=True, vllm_tp=8, vllm_kv_cache_gib=8.0))
    t = plan.per_phase["train"]
    assert t["optimizer"] == pytest.approx(12 * n / 2 / GiB)
    # full recompute: 2 s b h per layer, 20 layers on the stage, 4 micro-batches in flight (1F1B)
    assert t["activations"] == pytest.approx(2 * 4096 * 4 * 8192 * 20 * 4 / GiB)
    assert t["reference"] == 0.0
    assert check_fits(plan, 80.0) is None


def test_layout_that_does_not_fit_is_refused_with_the_arithmetic():
    plan = plan_memory(PlanInput(arch=L70B, tp=1, pp=1, dp=1, dtype="bfloat16", distributed_optimizer=False))
    msg = check_fits(plan, 80.0)
    assert msg is not None and "GiB per GPU > 80 GiB" in msg and "parallel.tp" in msg
    assert "weights" in msg and "optimizer" in msg
