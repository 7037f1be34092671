"""Memory planner against hand-computed numbers for Llama-3.1-8B and 70B layouts."""

from __future__ import annotations

import pytest

from metaapo_nemo.models.arch import arch_from_hf_dict
from metaapo_nemo.planner import (
    GiB,
    PlanInput,
    activation_bytes_per_layer,
    check_fits,
    checkpoint_bytes,
    checkpoint_report,
    moe_dispatch_bytes,
    params_per_rank,
    plan_input_from_config,
    plan_memory,
    vllm_profile_reserve_bytes,
)

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)

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
    # an explicit 10 GiB KV budget: vLLM = weights + KV + its profiling reserve
    reserve = sum(v for k, v in plan.terms.items() if k.startswith("vllm_reserve_"))
    assert g["vllm"] == pytest.approx(8_030_261_248 * 2 / 8 / GiB + 10.0 + reserve)
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


def test_context_parallelism_divides_a_rows_tokens_and_shards_the_optimizer_over_dp_x_cp():
    """cp=2: every rank holds half of each row, so the activations and logits of the 16k-token
    rows halve (exactly: s / c replaces s), and the distributed optimiser shards over d x c."""
    base = dict(arch=L70B, tp=8, pp=4, dp=2, dtype="bfloat16", distributed_optimizer=True, recompute="full",
                micro_batch_rows=1, num_microbatches=16, reference_offloaded=True, vllm_tp=8,
                vllm_kv_cache_gib=8.0)
    long_rows = plan_memory(PlanInput(**base, seq_length=16384))
    cp2 = plan_memory(PlanInput(**base, seq_length=16384, cp=2))
    half = plan_memory(PlanInput(**base, seq_length=8192))
    for phase, key in (("train", "activations"), ("train", "logits"), ("margins", "activations"),
                       ("margins", "logits")):
        assert cp2.per_phase[phase][key] == pytest.approx(half.per_phase[phase][key])
        assert cp2.per_phase[phase][key] < long_rows.per_phase[phase][key]
    n = params_per_rank(L70B, tp=8, pp=4)
    assert cp2.per_phase["train"]["optimizer"] == pytest.approx(12 * n / 4 / GiB)
    assert cp2.per_phase["train"]["nccl"] == long_rows.per_phase["train"]["nccl"] + 0.5  # the CP group's


def test_layout_that_does_not_fit_is_refused_with_the_arithmetic():
    plan = plan_memory(PlanInput(arch=L70B, tp=1, pp=1, dp=1, dtype="bfloat16", distributed_optimizer=False))
    msg = check_fits(plan, 80.0)
    assert msg is not None and "GiB per GPU > 80 GiB" in msg and "parallel.tp" in msg
    assert "weights" in msg and "optimizer" in msg


# ----------------------------------------------------------------- the shipped recipes
# Each term of finding 5 (issue 19) by hand for conf/llama31_8b_metaapo.yaml on 8 GPUs and
# conf/llama31_70b_metaapo.yaml on 64, through the same inputs --dry-run builds.


def _recipe_plan(conf: str, world: int, *overrides: str):
    from metaapo_nemo.config.cli import read_arch_json, reward_arch_or_reason
    from metaapo_nemo.config.loader import load_config

    cfg = load_config(conf, list(overrides))
    arch = arch_from_hf_dict(read_arch_json(cfg))
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world // (tp * pp)
    rm, unsized = reward_arch_or_reason(cfg)
    x = plan_input_from_config(cfg, arch, tp, pp, dp, cfg.train.micro_batches_per_step(dp), rm, unsized)
    return x, plan_memory(x)


def test_llama31_8b_metaapo_recipe_every_term_by_hand():
    x, plan = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8)  # TP2 x DP4, full recompute
    n = 4_015_132_672  # 32 layers x 218,112,000 / 2 + 2 x 64128 x 4096 + 4096
    assert plan.params_per_rank == n
    m, t, g, sc = (plan.per_phase[k] for k in ("margins", "train", "generate", "score"))
    for phase in (m, t, g, sc):
        assert phase["weights"] == pytest.approx(2 * n / GiB)
        assert phase["optimizer"] == pytest.approx(12 * n / 4 / GiB)  # distributed over DP4
        assert phase["cuda_context"] == 0.75
        assert phase["nccl"] == pytest.approx(0.5 * (3 + 1))  # TP, DP, world + vLLM TP2
    # margin pass on the offline pairs (2 rows per pair): one layer's forward working set,
    # 10 + 24/2 + 5*32*4096/(4096*2) = 102
    assert m["activations"] == pytest.approx(4096 * 2 * 4096 * 102 / GiB)
    assert m["logits"] == pytest.approx(4096 * 2 * 64128 * 4 / GiB)  # once, forward only
    assert m["vllm"] == 0.25  # asleep since it was built
    # training: 4 rows per prompt (offline + online pair)
    assert t["activations"] == pytest.approx(2 * 4096 * 4 * 4096 * 32 / GiB)  # full recompute
    assert t["logits"] == pytest.approx(2 * 4096 * 4 * 64128 * 4 / GiB)  # logits + their gradient
    assert m["reference"] == t["reference"] == pytest.approx(2 * n / GiB)  # resident: not offloaded
    assert g["vllm"] == pytest.approx(0.35 * 80)
    # vLLM's profiling reserve: forward of 16384 tokens, sampler over 1024 seqs, graphs, NCCL
    assert plan.terms["vllm_reserve_forward"] == pytest.approx(16384 * (3 * 14336 / 2 + 4 * 4096) * 2 / GiB)
    assert plan.terms["vllm_reserve_sampler"] == pytest.approx(3 * 1024 * 128256 * 4 / GiB)
    assert plan.terms["vllm_reserve_cudagraphs"] == 1.0 and plan.terms["vllm_reserve_nccl"] == 0.5
    weights = 8_030_261_248 * 2 / 2 / GiB
    reserve = (16384 * 37888 * 2 + 3 * 1024 * 128256 * 4) / GiB + 1.5
    assert plan.terms["vllm_kv"] == pytest.approx(28.0 - weights - reserve)  # 16.40 GiB
    assert plan.terms["vllm_kv_naive"] == pytest.approx(28.0 - weights)  # 20.52 GiB
    assert plan.terms["vllm_kv_tokens"] == pytest.approx((28.0 - weights - reserve) * GiB / (2 * 32 * 4 * 128 * 2))
    # the reward model (conf/models/llama31_8b_rm.json, offloaded): 32 layers x 218,112,000 +
    # the embedding + the final norm + the scalar head (no LM head), bf16, on the GPU while scoring
    rm = 32 * 218_112_000 + 128256 * 4096 + 4096 + 4096
    assert sc["reward"] == pytest.approx(2 * rm / GiB)  # 13.98 GiB
    assert all(p.get("reward", 0.0) == 0.0 for p in (m, t, g))
    # one forward of reward.batch_size 32 texts x (2048 prompt + 2048 new) tokens x
    # (3 x 4096 + 2 x 8 x 128 + 3 x 14336) x 2 B, and the padded batch's 32 x 4096 x 4096 mask
    assert sc["reward_activations"] == pytest.approx((32 * 4096 * 57344 * 2 + 32 * 4096**2) / GiB) == 14.5
    # the gathers move one chunk (metaapo.prompts_per_chunk 128) at a time: pairs,
    # ceil(128 / 8) prompts x 2 samples x 2048 tokens x 18 B x (8 + 1); samples (host), one
    # engine's ceil(128 / 4) prompts x 8 samples
    assert sc["pairs_gather"] == pytest.approx(16 * 2 * 2048 * 18 * 9 / GiB)
    assert plan.terms["samples_gather_host"] == pytest.approx(32 * 8 * 2048 * 18 * 9 / GiB)
    # host memory per rank (8 ranks per node), by phase
    h = plan.host_per_phase
    assert list(h) == ["margins", "train", "generate", "score", "checkpoint"]
    pairs = 20352 * 2 * 2048 * 36 / GiB  # the round's pairs as token-id tuples, every rank
    samples = 128 * 8 * 2048 * 76 / GiB  # one chunk's samples in Python
    vllm_host = 8_030_261_248 * 2 / 2 / GiB  # sleep level 1: its TP2 shard of the weights
    assert h["train"] == pytest.approx({"process": 5.0, "helpers": 0.35, "reference": 0.0, "reward": 2 * rm / GiB,
                                        "vllm_asleep": vllm_host, "hf_engine": 0.0, "round_pairs": pairs})
    assert h["generate"]["vllm_asleep"] == 0.0 and h["generate"]["chunk_samples"] == pytest.approx(samples)
    assert h["generate"]["samples_gather"] == pytest.approx(plan.terms["samples_gather_host"])
    assert h["score"]["reward"] == 0.0  # on the GPU while scoring
    # a save: the fully reshardable optimiser state (12 B/param of the TP shard) on every
    # DP rank's host, and the write share of the weights and the per-round reference
    assert h["checkpoint"]["optimizer_gather"] == pytest.approx(12 * n / GiB)
    assert h["checkpoint"]["write_staging"] == pytest.approx(n * 4 / 4 / GiB)
    phase, node = plan.host_worst
    assert phase == "checkpoint" and node == pytest.approx(8 * plan.host_peak("checkpoint"))
    assert plan.host_fits and "host peak" in plan.report(80.0) and "tokenised dataset" in plan.report(80.0)
    assert checkpoint_bytes(x.arch, x.dtype, x.checkpoint_reference) == 8_030_261_248 * 16
    assert plan.worst[0] == "score" and check_fits(plan, 80.0) is None
    report = plan.report(80.0)
    assert "headroom:" in report and "assumptions:" in report and "profiling reserve" in report


def test_llama31_70b_metaapo_recipe_every_term_by_hand():
    x, plan = _recipe_plan("conf/llama31_70b_metaapo.yaml", 64)  # TP8 x PP4 x DP2, FP8
    n = 20 * 855_654_400 // 8 + 8192 + 16032 * 8192  # the last stage (untied head + norm)
    assert plan.params_per_rank == n
    m, t, g, sc = (plan.per_phase[k] for k in ("margins", "train", "generate", "score"))
    assert t["optimizer"] == pytest.approx(12 * n / 2 / GiB)
    assert t["nccl"] == pytest.approx(0.5 * (5 + 1))  # TP, DP, world, 2 PP peers + vLLM TP8
    assert m["activations"] == pytest.approx(4096 * 2 * 8192 * (10 + 3 + 20) / GiB)
    assert t["activations"] == pytest.approx(2 * 4096 * 4 * 8192 * 20 * 4 / GiB)  # 4 in flight
    assert t["reference"] == g["reference"] == sc["reference"] == 0.0 and m["vllm"] == 0.25
    assert m["reference"] == pytest.approx(2 * n / GiB)  # offloaded: on the GPU for its forward
    weights = 70_553_706_496 * 2 / 8 / GiB  # 16.43 GiB
    reserve = (16384 * (3 * 28672 / 8 + 4 * 8192) * 2 + 3 * 1024 * 128256 * 4) / GiB + 1.5
    assert g["vllm"] == pytest.approx(0.3 * 80)
    assert plan.terms["vllm_kv"] == pytest.approx(24.0 - weights - reserve)  # 3.28 GiB
    # the KV cache vLLM will really get is less than half of util x GPU - weights (7.57 GiB)
    assert plan.terms["vllm_kv_naive"] / plan.terms["vllm_kv"] == pytest.approx(2.31, abs=0.01)
    assert plan.terms["vllm_kv_tokens"] == pytest.approx((24.0 - weights - reserve) * GiB / 40960)
    assert sc["pairs_gather"] == pytest.approx(4 * 2 * 2048 * 18 * 65 / GiB)  # ceil(256 / 64) prompts
    # host: an offloaded reference (its TP8 x PP4 shard) beside the reward model on every rank
    assert plan.host_per_phase["train"]["reference"] == pytest.approx(2 * n / GiB)
    assert plan.host_per_phase["margins"]["reference"] == 0.0  # on the GPU for its forward
    assert plan.host_per_phase["train"]["vllm_asleep"] == pytest.approx(70_553_706_496 * 2 / 8 / GiB)
    assert checkpoint_bytes(x.arch, x.dtype, True) == pytest.approx(1.1289e12, rel=1e-4)
    assert "1,128.9 GB, 17.6 GB per rank over 64" in checkpoint_report(x, 0.5, 0.45)
    assert check_fits(plan, 80.0) is None


@pytest.mark.parametrize("conf,world", [("conf/llama31_8b_metaapo.yaml", 8), ("conf/qwen25_7b_metaapo.yaml", 8),
                                        ("conf/llama31_70b_metaapo.yaml", 64)])
def test_release_recipes_plan_their_reward_model_and_refuse_an_unsized_one(conf, world):
    x, plan = _recipe_plan(conf, world)
    assert x.reward_arch is not None and x.reward_unsized is None and x.reward_batch_size == 32
    assert plan.per_phase["score"]["reward"] > 13.9 and "reward model: 7.50 B params" in plan.report(80.0)
    # a reward model that will run but cannot be sized here: no "fits", the key to set named
    _, unsized = _recipe_plan(conf, world, "reward.arch_config=null")
    message = check_fits(unsized, 80.0)
    assert message is not None and "reward.arch_config" in message and "DOES NOT FIT" in message
    assert "/checkpoints/reward-model/config.json not readable here" in message
    # kept on the GPU: counted in every phase; a bigger scoring batch shows in the score phase
    _, resident = _recipe_plan(conf, world, "reward.offload_to_cpu=false", "reward.batch_size=64")
    rm = plan.per_phase["score"]["reward"]
    for phase in ("margins", "train", "generate", "score"):
        assert resident.per_phase[phase]["reward"] == pytest.approx(rm)
    assert resident.per_phase["score"]["reward_activations"] == pytest.approx(
        2 * plan.per_phase["score"]["reward_activations"])


def test_host_memory_over_the_node_is_refused_with_the_knobs():
    x, plan = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8, "planner.host_memory_gib=256")
    assert x.host_memory_gib == 256 and not plan.host_fits
    message = check_fits(plan, 80.0)
    assert message.startswith("the checkpoint phase needs") and "planner.host_memory_gib" in message
    assert "reward.offload_to_cpu=false" in message and "DOES NOT FIT" in message
    # the reward model kept on the GPU leaves the host in every phase
    _, resident = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8, "reward.offload_to_cpu=false")
    assert all(p["reward"] == 0.0 for p in resident.host_per_phase.values())
    # a whole round per chunk holds that many samples at once
    _, whole = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8, "metaapo.prompts_per_chunk=null")
    assert whole.host_per_phase["score"]["chunk_samples"] == pytest.approx(
        20352 / 128 * plan.host_per_phase["score"]["chunk_samples"])


def test_ranks_per_node_come_from_the_sbatch_script_or_the_flags(monkeypatch):
    from metaapo_nemo.config.world import planned_ranks_per_node

    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    assert planned_ranks_per_node(64, sbatch="slurm/metaapo_llama31_70b.sbatch") == 8
    assert planned_ranks_per_node(2, sbatch="slurm/tiny_cpu_metaapo.sbatch") == 1
    assert planned_ranks_per_node(16, gpus_per_node=4) == 4
    assert planned_ranks_per_node(2) == 2
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")  # under srun: the launcher's tasks per node
    assert planned_ranks_per_node(16) == 4


def test_a_packed_row_longer_than_a_microbatch_is_planned_at_pack_tokens():
    x, _ = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8)
    assert (x.micro_batch_rows, x.seq_length) == (4, 4096)  # micro_batch_size 1 x 4 rows
    x, _ = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8, "train.pack_tokens=32768")
    assert (x.micro_batch_rows, x.seq_length, x.margin_rows) == (1, 32768, 1)


def test_the_reward_model_is_still_held_while_the_final_evaluation_runs():
    cfg, plan = _dry_run_plan(None, "metaapo", "reward.offload_to_cpu=false",
                              "eval.task=tasks.gold_eval:evaluate_run", "eval.max_new_tokens=8")
    assert plan.per_phase["score"]["reward"] > 0
    assert plan.per_phase["evaluate"]["reward"] == pytest.approx(plan.per_phase["score"]["reward"])
    assert plan.host_per_phase["evaluate"]["round_pairs"] > 0


def test_an_unreadable_reward_shape_is_named():
    # a config.json the planner cannot read (another family) is named with the reason
    x, plan = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8, "reward.arch_config=pyproject.toml")
    assert x.reward_unsized is not None and "reward.arch_config=pyproject.toml" in x.reward_unsized
    assert any("reward.arch_config" in p for p in plan.problems)


def test_margin_pass_beside_an_awake_engine_is_shown():
    x, _ = _recipe_plan("conf/llama31_8b_metaapo.yaml", 8)
    from dataclasses import replace

    awake = plan_memory(replace(x, vllm_sleeps_after_build=False))
    assert awake.per_phase["margins"]["vllm"] == pytest.approx(28.0)  # the whole allocation
    assert "runs beside the awake engine" in awake.report(80.0)


def test_a_kv_cache_below_one_request_is_refused():
    x, _ = _recipe_plan("conf/llama31_70b_metaapo.yaml", 64)
    from dataclasses import replace

    plan = plan_memory(replace(x, vllm_gpu_memory_utilization=0.25))  # 20 GiB < weights + reserve
    msg = check_fits(plan, 80.0)
    assert msg is not None and "cannot hold one request of 4096 tokens" in msg


# ----------------------------------------------------------------- what each method runs


def _dry_run_plan(conf: str | None, method: str, *overrides: str):
    from metaapo_nemo.config.cli import memory_plan
    from metaapo_nemo.config.loader import load_config

    cfg = load_config(conf, list(overrides), method=method)
    return cfg, memory_plan(cfg, 1, 1, 1, cfg.train.micro_batches_per_step(1))


def test_offline_plan_has_no_engine_or_reward_model():
    cfg, plan = _dry_run_plan(None, "dpo")
    assert list(plan.per_phase) == ["margins", "train"]
    for parts in plan.per_phase.values():
        assert parts.get("vllm", 0.0) == 0.0 and parts.get("reward", 0.0) == 0.0
    assert not any(k.startswith("vllm") for k in plan.terms)
    report = plan.report(cfg.planner.gpu_memory_gib)
    assert "vLLM" not in report and "vllm" not in report and "reward" not in report
    from metaapo_nemo.config.cli import dry_run_report, read_model_dims

    assert "vllm" not in dry_run_report(cfg, 1, read_model_dims(cfg)).split("memory plan per GPU")[1]


def test_offline_8b_and_70b_recipes_plan_no_engine():
    x, plan = _recipe_plan("conf/llama31_8b_dpo.yaml", 8)
    assert not x.rollout and not x.eval_engine and x.reward_arch is None
    assert x.micro_batch_rows == 2 and list(plan.per_phase) == ["margins", "train"]
    x, plan = _recipe_plan("conf/llama31_70b_dpo.yaml", 64)
    assert plan.per_phase["train"]["reference"] == 0.0 and plan.per_phase["margins"]["reference"] > 0


def test_reference_offload_counts_the_same_in_both_methods():
    # what FrozenReference does for every method: on the GPU for its forward passes only
    over = ("reference.offload_to_cpu=true",)
    _, dpo = _dry_run_plan(None, "dpo", *over)
    _, meta = _dry_run_plan(None, "metaapo", *over)
    _, resident = _dry_run_plan(None, "metaapo")
    ref = resident.per_phase["train"]["reference"]
    assert ref > 0 and resident.per_phase["generate"]["reference"] == ref
    for plan in (dpo, meta):
        assert plan.per_phase["margins"]["reference"] == pytest.approx(ref)
        assert all(p["reference"] == 0.0 for k, p in plan.per_phase.items() if k != "margins")
    assert set(meta.per_phase) == {"margins", "train", "generate", "score"}
    assert "reference offloaded to the CPU" in meta.report(80.0)


def test_metaapo_plan_counts_its_reward_model_and_rows():
    cfg, plan = _dry_run_plan(None, "metaapo", "reward.offload_to_cpu=false")
    from metaapo_nemo.config.cli import reward_arch

    rm = reward_arch(cfg)
    assert rm is not None and rm.hidden_size == 64  # conf/tiny_cpu.yaml's tiny RM
    # bf16 (reward.dtype auto: bf16 on GPU); a scalar head in place of the LM head
    rm_gib = (rm.num_parameters - (0 if rm.tie_word_embeddings else rm.vocab_size * 64) + 64) * 2 / GiB
    assert plan.per_phase["score"]["reward"] == pytest.approx(rm_gib)
    assert plan.per_phase["train"]["reward"] == pytest.approx(rm_gib)  # not offloaded
    x = plan_input_from_config(cfg, arch_from_hf_dict(_tiny_hf(cfg)), 1, 1, 1, 4)
    assert (x.micro_batch_rows, x.margin_rows) == (8, 4)  # 4 rows per prompt; 2 per offline pair
    # sampling none: the same loop (4 rows per prompt), no engine, no reward model
    _, none = _dry_run_plan(None, "metaapo", "metaapo.sampling=none", "metaapo.weights=one")
    assert list(none.per_phase) == ["margins", "train"]


def test_eval_engine_is_planned_for_the_offline_method():
    # conf/smollm2_dpo.yaml's evaluation engine, on the tiny model (no SmolLM2 download here)
    cfg, plan = _dry_run_plan("conf/smollm2_dpo.yaml", "dpo", "model.path=null", "model.tiny.arch=llama")
    assert list(plan.per_phase) == ["margins", "train", "evaluate"]
    assert "vllm" not in plan.per_phase["train"] and "reward" not in plan.per_phase["train"]
    assert plan.per_phase["evaluate"]["vllm"] == pytest.approx(cfg.rollout.gpu_memory_utilization * 80)
    assert "evaluate: the evaluation engine" in plan.report(80.0)


def _tiny_hf(cfg) -> dict:
    from metaapo_nemo.config.cli import _tiny_hf_dict

    return _tiny_hf_dict(cfg.model.tiny)


def _shipped_world(cfg, conf: str) -> int:
    from metaapo_nemo.config.world import read_sbatch, scripts_running

    scripts = scripts_running(conf)
    if scripts:
        return read_sbatch(scripts[0]).world_size()[0]
    p = cfg.parallel
    return max(p.tp * p.pp * p.cp, cfg.rollout.tp if cfg.rollout is not None else 1)


@pytest.mark.parametrize("conf", sorted(str(p.relative_to(p.parents[1])) for p in
                                        __import__("pathlib").Path(__file__).parents[1].glob("conf/*.yaml")))
def test_every_shipped_recipe_plans_every_component_its_method_runs(conf):
    """Each conf/*.yaml: whatever its method runs is counted in the plan (a phase term > 0), or
    named as what the plan could not count; nothing that runs is silently absent."""
    from metaapo_nemo.config.cli import memory_plan, read_arch_json
    from metaapo_nemo.config.loader import load_config

    cfg = load_config(conf, [])
    assert cfg.model.tiny is not None or read_arch_json(cfg) is not None, f"{conf}: set model.arch_config"
    world = _shipped_world(cfg, conf)
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    dp = world // (tp * pp)
    plan = memory_plan(cfg, tp, pp, dp, cfg.train.micro_batches_per_step(dp))
    assert plan is not None, f"{conf}: no plan"
    train, margins = plan.per_phase["train"], plan.per_phase["margins"]
    assert train["weights"] > 0 and train["grads"] > 0 and train["optimizer"] > 0 and train["activations"] > 0
    if cfg.lora is not None:  # the base with its adapters off: no reference weights, adapters planned
        assert train["adapters"] > 0 and train["grads"] < train["weights"]
        assert margins["reference"] == (train["adapters"] if cfg.metaapo and cfg.metaapo.reference == "per_round"
                                        else 0.0)
    elif cfg.loss.name != "simpo":  # the reference runs its forward in the margins phase
        assert margins["reference"] > 0
    sampling = cfg.method == "metaapo" and cfg.metaapo.sampling != "none"
    report = plan.report(cfg.planner.gpu_memory_gib)
    if sampling:
        assert {"generate", "score"} <= set(plan.per_phase)
        engine_bytes = plan.per_phase["generate"].get("vllm", 0.0) + sum(
            h.get("hf_engine", 0.0) for h in plan.host_per_phase.values())
        assert engine_bytes > 0, f"{conf}: the rollout engine is not counted"
        assert plan.host_per_phase["train"]["round_pairs"] > 0 and plan.host_per_phase["score"]["chunk_samples"] > 0
        if cfg.reward.backend == "hf":
            assert plan.per_phase["score"]["reward"] > 0 and plan.per_phase["score"]["reward_activations"] > 0
        else:
            assert "reward model: none (a rule reward" in report
    else:
        assert "generate" not in plan.per_phase and "score" not in plan.per_phase
    if cfg.eval is not None:
        assert "evaluate" in plan.per_phase
    host = plan.host_per_phase
    assert host["checkpoint"]["optimizer_gather"] > 0 and all(h["process"] > 0 for h in host.values())
    assert any("tokenised dataset" in u for u in plan.host_uncounted)  # named where it is not counted
    assert not plan.problems, f"{conf}: {plan.problems}"


def test_the_plan_is_enforced_when_a_run_starts_on_gpus():
    """run.setup calls startup_memory_check with the loaded architecture and the device's memory."""
    from metaapo_nemo.config.cli import read_arch_json, startup_memory_check
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.config.schema import ConfigError

    cfg = load_config("conf/llama31_8b_metaapo.yaml", [])
    arch = arch_from_hf_dict(read_arch_json(cfg))
    assert startup_memory_check(cfg, arch, 2, 1, 4, on_gpu=True, gpu_memory_gib=79.2) is None  # an H100 80GB
    assert startup_memory_check(cfg, arch, 2, 1, 4, on_gpu=False) is None  # CPU runs are not refused
    with pytest.raises(ConfigError, match="checked at start-up") as err:  # a 40 GiB device
        startup_memory_check(cfg, arch, 2, 1, 4, on_gpu=True, gpu_memory_gib=40.0)
    assert "vs 40 GiB per GPU: DOES NOT FIT" in str(err.value)
    warn = load_config("conf/llama31_8b_metaapo.yaml", ["planner.on_exceed=warn"])
    message = startup_memory_check(warn, arch, 2, 1, 4, on_gpu=True, gpu_memory_gib=40.0)
    assert message is not None and "planner.on_exceed=warn: continuing" in message


def test_a_mixture_of_experts_layer_counts_every_expert_and_its_routed_activations():
    """Qwen3-30B-A3B's shape: 128 experts of width 768, top 8. Parameters: attention + q/k norms +
    router + every expert (split by TP; no expert parallelism yet); activations: the dense MLP's
    16 s b h / t replaced by the k routed copies s b (k (2 h + 6 I / t) + 4 E)."""
    cfg = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
               num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, max_position_embeddings=40960)
    moe = arch_from_hf_dict(cfg)
    h, e, i = 2048, 128, 768
    attn = h * 128 * (32 + 8) + 128 * 32 * h + 2 * 128
    assert moe.layer_parameters == attn + e * (3 * h * i + h) + 2 * h
    assert 30.0e9 < moe.num_parameters < 31.0e9  # "30B-A3B"
    s, b, t = 4096, 1, 4
    selective = activation_bytes_per_layer(moe, s, b, t, "selective")
    assert selective == s * b * h * (10 + 24 / t) + s * b * (8 * (2 * h + 6 * i / t) + 4 * e - 16 * h / t)
    assert activation_bytes_per_layer(moe, s, b, t, "full") == 2 * s * b * h  # only the layer input
    # expert parallel 8: each rank holds 16 experts; the distributed optimiser shards dense
    # parameters over d x c = 8 ranks and experts over d x c / ep = 1
    experts = 48 * e * 3 * h * i // 4  # pp 1, tp 4
    assert params_per_rank(moe, 4, 1, 8) == params_per_rank(moe, 4, 1) - experts + experts // 8
    plan = plan_memory(PlanInput(arch=moe, tp=4, pp=1, dp=8, ep=8, distributed_optimizer=True, recompute="full",
                                 seq_length=4096, micro_batch_rows=4, vllm_kv_cache_gib=8.0))
    n = params_per_rank(moe, 4, 1, 8)
    assert plan.per_phase["train"]["optimizer"] == pytest.approx(12 * ((n - experts // 8) / 8 + experts // 8) / GiB)
    # one layer's router and dispatcher buffers, beside the saved activations, in both Megatron phases
    dispatch = 4096 * 4 * (2 * 8 * h * 2 + 9 * e)  # bf16 routed copies before/after the all-to-all
    assert moe_dispatch_bytes(moe, 4096, 4, 2) == dispatch
    assert plan.per_phase["train"]["moe_dispatch"] == pytest.approx(dispatch / GiB)
    assert plan.per_phase["margins"]["moe_dispatch"] == pytest.approx(dispatch / GiB)  # margin rows = b
    assert moe_dispatch_bytes(arch_from_hf_dict(cfg | dict(model_type="qwen3", num_experts=0)), 4096, 4, 2) == 0


def test_the_engine_of_a_mixture_of_experts_model_itemises_its_experts_and_fused_moe_workspace():
    """vLLM's weights include every expert (split over its TP ranks), itemised as vllm_expert_weights;
    the profiling forward of a MoE model holds fused MoE's (T, k, 2I), (T k, I), (T, k, h) caches and
    the fp32 router logits instead of the dense MLP's T x 3I."""
    cfg = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
               num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
               num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, max_position_embeddings=40960)
    moe = arch_from_hf_dict(cfg)
    x = PlanInput(arch=moe, tp=1, pp=1, dp=16, ep=8, distributed_optimizer=True, recompute="full", seq_length=4096,
                  micro_batch_rows=1, rollout=True, vllm_tp=2, vllm_gpu_memory_utilization=0.5,
                  vllm_max_num_batched_tokens=8192)
    t, k, i, h, e = 8192, 8, 768, 2048, 128
    assert vllm_profile_reserve_bytes(x)["forward"] == t * (k * (3 * i / 2 + h) + 4 * h) * 2.0 + t * e * 4.0
    plan = plan_memory(x)
    assert plan.terms["vllm_expert_weights"] == pytest.approx(48 * e * 3 * h * i * 2 / 2 / GiB)
    assert plan.terms["vllm_expert_weights"] < plan.terms["vllm_weights"]
    assert any("experts" in a and "of it" in a for a in plan.assumptions)
    dense = PlanInput(arch=arch_from_hf_dict(cfg | dict(model_type="qwen3", num_experts=0)), tp=1, pp=1, dp=16,
                      rollout=True, vllm_tp=2, vllm_gpu_memory_utilization=0.5, vllm_max_num_batched_tokens=8192)
    assert vllm_profile_reserve_bytes(dense)["forward"] == t * (3 * 6144 / 2 + 4 * h) * 2.0
    assert plan_memory(dense).terms["vllm_expert_weights"] == 0


def test_sequence_parallelism_splits_the_replicated_activations_over_tp():
    """Korthikanti et al.: with SP the 10 s b h that TP alone replicates is split too (34/t), and
    a full-recompute layer's saved input is a sequence shard (2 s b h / t)."""
    arch = arch_from_hf_dict(dict(LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32))
    s, b, h, t = 4096, 1, 4096, 4
    assert activation_bytes_per_layer(arch, s, b, t, "selective", True) == s * b * h * (10 / t + 24 / t)
    assert activation_bytes_per_layer(arch, s, b, t, "full", True) == 2 * s * b * h / t
    cfg = dict(arch=arch, tp=4, pp=1, dp=2, seq_length=s, micro_batch_rows=b, recompute="selective",
               vllm_kv_cache_gib=8.0)
    sp = plan_memory(PlanInput(**cfg, sequence_parallel=True)).per_phase["train"]["activations"]
    plain = plan_memory(PlanInput(**cfg)).per_phase["train"]["activations"]
    assert sp == pytest.approx(plain * (34 / t) / (10 + 24 / t))


def test_lora_plans_the_adapters_only_for_gradients_and_the_optimiser_and_no_reference():
    """Llama-3.1-8B at TP2, rank 16 on every linear: per layer A [16, in] + B [out, 16] per
    projection with the column-parallel B and the row-parallel A split over TP; the base keeps its
    bf16 weights only; no reference weights (the base with the adapters off)."""
    from metaapo_nemo.planner import lora_params_per_rank

    arch = arch_from_hf_dict(dict(LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32))
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    h, kv, i, r = 4096, 1024, 14336, 16
    per_layer = r * ((h + h // 2) + 2 * (h + kv // 2) + (h // 2 + h) + 2 * (h + i // 2) + (i // 2 + h))
    assert lora_params_per_rank(arch, 2, 1, r, targets) == 32 * per_layer
    base = dict(arch=arch, tp=2, pp=1, dp=4, seq_length=2048, micro_batch_rows=2, recompute="full",
                vllm_kv_cache_gib=8.0, rollout=False)
    full = plan_memory(PlanInput(**base)).per_phase["train"]
    lora = plan_memory(PlanInput(**base, lora_rank=r, lora_targets=targets)).per_phase["train"]
    n, a = params_per_rank(arch, 2, 1), 32 * per_layer
    assert lora["weights"] == full["weights"] == pytest.approx(n * 2 / GiB)
    assert lora["adapters"] == pytest.approx(a * 2 / GiB)
    assert lora["grads"] == pytest.approx(4 * a / GiB) and lora["optimizer"] == pytest.approx(12 * a / 4 / GiB)
    assert lora["reference"] == 0.0 < full["reference"]
    assert sum(lora.values()) < sum(full.values()) - 20  # the 8B full-parameter state it does not hold
    # lora.refit=adapters: vLLM's one LoRA slot (rank 16, split over its TP as Megatron's) comes out of the
    # KV cache; the refit moves the full adapters (TP1 count) in the model's dtype
    engine = dict(base, rollout=True, vllm_gpu_memory_utilization=0.4, vllm_tp=2, lora_rank=r, lora_targets=targets)
    served, merged = plan_memory(PlanInput(**engine, vllm_lora_rank=16)), plan_memory(PlanInput(**engine))
    assert served.terms["vllm_lora_slots"] == pytest.approx(a * 2 / GiB)
    assert served.terms["vllm_kv"] == pytest.approx(merged.terms["vllm_kv"] - a * 2 / GiB)
    assert served.terms["refit_adapters"] == pytest.approx(lora_params_per_rank(arch, 1, 1, r, targets) * 2 / GiB)
    assert "vllm_lora_slots" not in merged.terms


def test_lora_merged_compute_plans_one_copy_of_the_adapted_linears_per_schedule():
    """lora.compute=merged holds W + s B A of every adapted linear while a schedule runs (the training
    step, the margin pass): Llama-3.1-8B at TP2, bf16; qkv is merged whole when only q is targeted."""
    from metaapo_nemo.planner import lora_merged_params_per_rank

    arch = arch_from_hf_dict(dict(LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32))
    h, kv, i = 4096, 1024, 14336
    all_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    per_layer = (h * (h + 2 * kv) + h * h + 2 * h * i + i * h) // 2
    assert lora_merged_params_per_rank(arch, 2, 1, all_linear) == 32 * per_layer
    assert lora_merged_params_per_rank(arch, 2, 2, ("q_proj",)) == 16 * h * (h + 2 * kv) // 2
    base = dict(arch=arch, tp=2, pp=1, dp=4, seq_length=2048, micro_batch_rows=2, recompute="full",
                vllm_kv_cache_gib=8.0, rollout=False, lora_rank=16, lora_targets=all_linear)
    adapters, merged = (plan_memory(PlanInput(**base, lora_merged=m)) for m in (False, True))
    for phase in ("train", "margins"):
        assert "lora_merged_weights" not in adapters.per_phase[phase]
        assert merged.per_phase[phase]["lora_merged_weights"] == pytest.approx(32 * per_layer * 2 / GiB)
    assert any("lora.compute=merged" in line for line in merged.assumptions)
    from metaapo_nemo.config import load_config
    from metaapo_nemo.planner import plan_input_from_config

    cfg = load_config("conf/tiny_cpu.yaml", ["lora.rank=4", "lora.compute=merged"])
    assert plan_input_from_config(cfg, arch_from_hf_dict(_tiny_hf(cfg)), 1, 1, 1, 4).lora_merged
