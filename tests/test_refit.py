"""Weight refit, staleness and fault handling with a stand-in engine (no vLLM needed).

The real engine is exercised in test_rollout.py; here the seams are checked exactly: the
buckets that reach `Generator.load_weights` (measured bytes vs the cap, fusion groups never
split, every tensor once and unchanged), the step bookkeeping, and failures mid-push.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from metaapo_nemo.rollout.generator import (
    PromptBatch,
    RefitError,
    SamplingSettings,
    StaleWeightsError,
    derive_seed,
    split_under_budget,
)
from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup, split_indices
from metaapo_nemo.rollout.refit import RefitStats, fusion_key, iter_buckets, push_weights
from tests.rollout_fakes import FakeGenerator

SINGLE = EnginePlacement("single", True, True, 0, 1)


@pytest.fixture
def policy(single_ctx, tiny_qwen2):
    """The tiny Qwen2 (q/k/v biases, tied embeddings) as a frozen MegatronLM."""
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM

    return MegatronLM(load_arch(tiny_qwen2), single_ctx, tiny_qwen2, BuildOptions())


def test_fusion_key():
    assert fusion_key("model.layers.3.self_attn.k_proj.bias") == "model.layers.3.self_attn.qkv_proj"
    assert (
        fusion_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.qkv_proj"
    )
    assert fusion_key("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.gate_up_proj"
    assert fusion_key("model.layers.0.self_attn.o_proj.weight") == "model.layers.0.self_attn.o_proj"
    assert fusion_key("model.norm.weight") == "model.norm"
    assert fusion_key("model.embed_tokens.weight") == "model.embed_tokens"


def _groups(names: list[str]) -> dict[str, int]:
    return {n: i for i, n in enumerate(names)}


@pytest.mark.parametrize("cap_kind", ["below_largest_group", "largest_group", "whole_model"])
def test_push_respects_cap_and_groups(policy, single_ctx, tiny_qwen2, cap_kind):
    """Measured bucket bytes <= cap (or one oversize group alone); groups never split."""
    hf = load_file(str(tiny_qwen2 / "model.safetensors"))
    sizes: dict[str, int] = {}
    for name, tensor in hf.items():
        sizes[fusion_key(name)] = sizes.get(fusion_key(name), 0) + tensor.numel() * 4
    cap = {
        "below_largest_group": 64 << 10,
        "largest_group": max(sizes.values()),
        "whole_model": sum(sizes.values()),
    }[cap_kind]
    fake = FakeGenerator()
    group = RolloutGroup(fake, SINGLE, single_ctx)
    stats = group.push_megatron(policy.modules(), policy.arch, policy_step=1, cap_bytes=cap)

    assert sorted(fake.loaded) == sorted(hf)  # every tensor, once
    for name, tensor in hf.items():
        torch.testing.assert_close(fake.loaded[name], tensor, rtol=0, atol=0)
    assert stats.tensors == len(hf) and stats.buckets == len(fake.bucket_bytes)
    assert stats.peak_bucket_bytes == max(fake.bucket_bytes)
    where = {n: b for b, names in enumerate(fake.bucket_names) for n in names}
    keys: dict[str, set[int]] = {}
    for name, b in where.items():
        keys.setdefault(fusion_key(name), set()).add(b)
    assert all(len(b) == 1 for b in keys.values()), "a fusion group was split across buckets"
    for b, size in enumerate(fake.bucket_bytes):
        members = {fusion_key(n) for n in fake.bucket_names[b]}
        if size > cap:  # only a single group larger than the cap may exceed it
            assert len(members) == 1 and sizes[members.pop()] > cap
    assert set(stats.oversize_groups) == {k for k, v in sizes.items() if v > cap}
    if cap_kind == "whole_model":
        assert stats.buckets == 1
    if cap_kind == "largest_group":  # every group fits: the cap holds for every bucket
        assert not stats.oversize_groups and max(fake.bucket_bytes) <= cap
        assert stats.buckets > 3
    assert group.pushed_step == 1 and fake.weights_step == 1


def test_interrupted_fusion_group_is_refused():
    t = torch.zeros(2)
    stream = [
        ("model.layers.0.self_attn.q_proj.weight", t),
        ("model.norm.weight", t),
        ("model.layers.0.self_attn.k_proj.weight", t),
    ]
    with pytest.raises(ValueError, match="interrupted"):
        list(iter_buckets(stream, 1 << 20, RefitStats(policy_step=0)))


def test_generating_with_older_weights_raises():
    fake = FakeGenerator(initial_step=0)
    group = RolloutGroup(fake, SINGLE)
    batch = PromptBatch.build([[5, 6, 7]], round=2)
    settings = SamplingSettings(n=2, max_new_tokens=4)
    assert len(group.generate(batch, settings, policy_step=0)) == 1
    with pytest.raises(StaleWeightsError, match=r"weights of step 0, older than"):
        group.generate(batch, settings, policy_step=1)
    with pytest.raises(StaleWeightsError, match="step 0, older"):  # the engine checks too
        fake.generate(batch, settings, policy_step=1)
    group.push([("model.norm.weight", torch.ones(4))], policy_step=1, cap_bytes=1 << 20)
    assert group.generate(batch, settings, policy_step=1)[0].key == 0
    with pytest.raises(StaleWeightsError, match="newer than"):
        group.generate(batch, settings, policy_step=0)


def test_failure_mid_push_marks_stale_and_names_step():
    fake = FakeGenerator(initial_step=4, fail_at_bucket=1)
    group = RolloutGroup(fake, SINGLE, initial_step=4)
    consumed = []

    def stream():
        for i in range(6):
            consumed.append(i)
            yield f"model.layers.{i}.input_layernorm.weight", torch.ones(256)

    with pytest.raises(RefitError, match="policy step 5") as info:
        group.push(stream(), policy_step=5, cap_bytes=2 * 256 * 4)
    assert info.value.policy_step == 5 and info.value.bucket == 1
    assert consumed == list(range(6)), "the stream must be drained (peers are in collectives)"
    assert fake.weights_step is None and group.pushed_step is None
    batch = PromptBatch.build([[1, 2]])
    with pytest.raises(StaleWeightsError, match="push for policy step 5 failed"):
        group.generate(batch, SamplingSettings(n=2, max_new_tokens=3), policy_step=5)
    with pytest.raises(StaleWeightsError, match="failed at bucket 1"):
        fake.generate(batch, SamplingSettings(n=2, max_new_tokens=3), policy_step=5)
    fake.fail_at_bucket = None  # the next push succeeds and clears the flag
    group.push(stream(), policy_step=5, cap_bytes=1 << 20)
    assert group.generate(batch, SamplingSettings(n=2, max_new_tokens=3), policy_step=5)


def test_push_without_engine_only_drains():
    stats, error = push_weights(
        ((f"model.layers.{i}.mlp.down_proj.weight", torch.ones(8)) for i in range(3)),
        None,
        policy_step=2,
        cap_bytes=64,
    )
    assert error is None and stats.tensors == 3 and stats.bytes == 96
    assert stats.buckets == 2 and stats.peak_bucket_bytes == 64  # 32 + 32 bytes, then 32


def test_backend_exception_becomes_refit_error():
    class Broken(FakeGenerator):
        def load_weights(self, buckets, policy_step):
            next(iter(buckets))
            raise KeyError("boom")

    _, error = push_weights([("model.norm.weight", torch.ones(2))], Broken(), 7, 1 << 10)
    assert isinstance(error, RefitError) and error.policy_step == 7 and "KeyError" in str(error)


def test_sleep_wake_and_shutdown_reach_engine():
    fake = FakeGenerator()
    calls = []
    group = RolloutGroup(fake, SINGLE, on_shutdown=lambda: calls.append("released"))
    group.sleep()
    assert fake.asleep
    group.wake()
    assert not fake.asleep
    group.shutdown()
    group.shutdown()  # idempotent
    assert fake.closed and calls == ["released"]


def test_seeds_are_stable_and_distinct():
    assert derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    seeds = {derive_seed(0, r, key, k) for r in range(3) for key in range(20) for k in range(8)}
    assert len(seeds) == 3 * 20 * 8 and all(0 <= s < 2**63 for s in seeds)


def test_world_level_generate_splits_then_restores_order():
    """Samples do not depend on how prompts are split over engines (seeds by key)."""
    batch = PromptBatch.build(
        [[i + 4, 5] for i in range(7)], keys=[30, 10, 20, 60, 50, 40, 0], round=3
    )
    settings = SamplingSettings(n=3, max_new_tokens=5, seed=11)
    whole = RolloutGroup(FakeGenerator(), SINGLE).generate(batch, settings, 0)
    assert [g.key for g in whole] == list(batch.keys)
    parts = [
        FakeGenerator().generate(batch.select(split_indices(7, 3, e)), settings, 0)
        for e in range(3)
    ]
    assert [g for part in parts for g in part] == whole


def test_split_indices_cover_everything():
    for n in range(12):
        for parts in range(1, 5):
            got = [i for e in range(parts) for i in split_indices(n, parts, e)]
            assert got == list(range(n))


def test_split_under_budget():
    # budget 20: prompts of 8 tokens + 1 decode token -> two per call
    assert split_under_budget([8, 8, 8, 8, 8], 4, 20) == [[0, 1], [2, 3], [4]]
    # KV: blocks of 4 tokens, each request needs ceil((8 + 4) / 4) = 3 of the 7 blocks
    assert split_under_budget([8, 8, 8], 4, 1000, kv_blocks=7, block_size=4) == [[0, 1], [2]]
    with pytest.raises(ValueError, match="max_num_batched_tokens=8"):
        split_under_budget([8], 4, 8)
    with pytest.raises(ValueError, match="KV"):
        split_under_budget([8], 100, 1000, kv_blocks=2, block_size=4)


def test_prompt_batch_validation():
    with pytest.raises(ValueError, match="distinct"):
        PromptBatch.build([[1], [2]], keys=[3, 3])
    with pytest.raises(ValueError, match="no tokens"):
        PromptBatch.build([[1], []])
    batch = PromptBatch.build([[1], [2], [3]], keys=[7, 8, 9], round=4)
    assert batch.select([2, 0]).keys == (9, 7)
    assert batch.describe(limit=2) == "round 4, 3 prompts, keys [7, 8, ...]"


def _ctx(rank: int, world: int, tp: int = 1, pp: int = 1, cp: int = 1):
    """Megatron's rank order: tp fastest, then cp, dp, pp."""
    dims = SimpleNamespace(world_size=world, tp=tp, pp=pp, cp=cp)
    return SimpleNamespace(
        dims=dims,
        rank=rank,
        tp_rank=rank % tp,
        cp_rank=(rank // tp) % cp,
        pp_rank=rank // (world // pp),
        dp_rank=(rank // (tp * cp)) % (world // (tp * pp * cp)),
    )


def test_engine_placement():
    assert EnginePlacement.for_context(None).mode == "single"
    # CPU, TP=2 x DP=2 (4 ranks): ranks 0 and 2 host, one engine per replica
    cpu = [EnginePlacement.for_context(_ctx(r, 4, tp=2), on_gpu=False) for r in range(4)]
    assert [p.hosts_engine for p in cpu] == [True, False, True, False]
    assert [p.engine_index for p in cpu] == [0, 0, 1, 1] and cpu[0].num_engines == 2
    # CPU, PP=2: only the first stage's first rank hosts
    pp = [EnginePlacement.for_context(_ctx(r, 2, pp=2), on_gpu=False) for r in range(2)]
    assert [p.hosts_engine for p in pp] == [True, False]
    # CPU, CP=2 x DP=2: the CP ranks of a replica share its one engine
    cp = [EnginePlacement.for_context(_ctx(r, 4, cp=2), on_gpu=False) for r in range(4)]
    assert [p.hosts_engine for p in cp] == [True, False, True, False]
    assert [p.engine_index for p in cp] == [0, 0, 1, 1] and cp[0].num_engines == 2
    # GPU, 4 ranks, generation TP=2: every rank hosts a shard, ranks 0 and 2 lead
    gpu = [EnginePlacement.for_context(_ctx(r, 4), gen_tp=2, on_gpu=True) for r in range(4)]
    assert all(p.hosts_engine for p in gpu) and [p.leader for p in gpu] == [
        True,
        False,
        True,
        False,
    ]
    assert [p.engine_index for p in gpu] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="needs CUDA"):
        EnginePlacement.for_context(_ctx(0, 2), gen_tp=2, on_gpu=False)
    with pytest.raises(ValueError, match="does not divide"):
        EnginePlacement.for_context(_ctx(0, 6), gen_tp=4, on_gpu=True)


def test_rollout_and_reward_import_without_vllm():
    import subprocess
    import sys

    code = (
        "import sys, metaapo_nemo.rollout, metaapo_nemo.reward; "
        "bad = [m for m in ('vllm', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_compat_can_be_suspended(single_ctx):
    from torch.overrides import _get_current_function_mode_stack as modes

    from metaapo_nemo.parallel import cpu_compat

    if not cpu_compat.active():
        pytest.skip("CUDA machine: no CPU shims to suspend")
    assert cpu_compat._MODE in modes()
    with cpu_compat.suspended():
        assert cpu_compat._MODE not in modes()
        assert torch.zeros(1, device="cpu").device.type == "cpu"
    assert modes()[-1] is cpu_compat._MODE
