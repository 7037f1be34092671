"""Multi-process worker for the rollout layout test: train, push, compare, per layout.

    torchrun --standalone --nproc-per-node 2 tests/workers/rollout_worker.py SPEC.json

SPEC.json: ``{"model_dir", "out", "runs", "cap", "layouts": [[tp, pp], ...]}``. For each
training layout, in the same processes: one DPO step (metaapo_nemo.run build/fit), a
check that generating before the push raises, a bucketed push of the Megatron shards
(TP gather + PP broadcast on both ranks) into the ONE vLLM engine on rank 0, then vLLM's
greedy tokens vs `greedy_decode` and vLLM's sampled-token log-probs vs `sampled_logprobs`
(T = 1.0 and 0.7), both computed by the sharded policy on every rank. The engine is
built once (first layout) and reused; rank 0 writes the measurements to ``out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

QUESTIONS = [
    "What is 3 + 4?",
    "List three colours.",
    "What is the capital of Peru?",
    "Give me one sentence about the sea.",
]
NEW_TOKENS = 16
TIE = 1e-4



def _keep_default_group() -> None:
    """Each layout rebuilds megatron's groups; torch's default group (and vLLM's) stay."""
    from metaapo_nemo.parallel import state

    def destroy_model_parallel_only() -> None:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()

    state.destroy = destroy_model_parallel_only


def _batch(tokenizer):
    from metaapo_nemo.rollout.generator import PromptBatch

    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ids = []
    for m in msgs:
        out = tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        ids.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    return PromptBatch.build(ids, messages=msgs)


def _compared(engine: list[int], megatron: list[int], gaps: list[float]) -> int:
    for j, (a, b) in enumerate(zip(engine, megatron)):
        if a != b:
            if gaps[j] >= TIE:
                raise AssertionError(f"token {j}: vLLM {a} != Megatron {b}, gap {gaps[j]:.2e}")
            return j
    return len(engine)


def run_layout(spec: dict, tp: int, pp: int, first_group):
    from metaapo_nemo import run as R
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.config.schema import RolloutConfig
    from metaapo_nemo.models.decode import greedy_decode, sampled_logprobs
    from metaapo_nemo.rollout.generator import SamplingSettings, StaleWeightsError
    from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup, build_rollout_group

    cfg = load_config(
        None,
        [
            f"model.path={spec['model_dir']}",
            "model.tiny=null",
            f"parallel.tp={tp}",
            f"parallel.pp={pp}",
            f"run.output_dir={spec['runs']}",
            f"run.name=tp{tp}pp{pp}",
            "train.max_steps=1",
            "train.save_final_hf=false",
            "train.progress_bar=off",
        ],
        method="dpo",
    )
    c = R.build(cfg, "dpo")
    cfg = cfg.model_copy(update={"rollout": RolloutConfig(max_new_tokens=NEW_TOKENS, kv_cache_memory_mb=64)})
    if first_group is None:
        group = build_rollout_group(cfg, spec["model_dir"], c.ctx)
    else:  # reuse the engine; its weights are another job's until the push
        group = RolloutGroup(
            first_group.generator, EnginePlacement.for_context(c.ctx), c.ctx, initial_step=None
        )
    st = R.fit(c)
    batch = _batch(c.tokenizer)
    sample = SamplingSettings(n=3, temperature=1.0, max_new_tokens=NEW_TOKENS, seed=3)
    try:
        group.generate(batch, sample, st.step)
        stale = False
    except StaleWeightsError:
        stale = True
    stats = group.push_megatron(c.policy.modules(), c.policy.arch, st.step, spec["cap"])

    greedy = group.generate(
        batch, SamplingSettings(n=1, temperature=0.0, max_new_tokens=NEW_TOKENS), st.step
    )
    ref = greedy_decode(c.policy, batch.prompt_ids, NEW_TOKENS, [c.tokenizer.eos_token_id])
    compared = sum(
        _compared(list(g.samples[0].token_ids), r, gp)
        for g, r, gp in zip(greedy, ref.tokens, ref.gaps)
    )
    diffs, seen = {}, []
    for temperature in (1.0, 0.7):
        settings = SamplingSettings(n=3, temperature=temperature, max_new_tokens=NEW_TOKENS, seed=9)
        out = group.generate(batch, settings, st.step)
        samples = [s for g in out for s in g.samples]
        prompts = [g.prompt_ids for g in out for _ in g.samples]
        lps = sampled_logprobs(c.policy, prompts, [s.token_ids for s in samples], temperature)
        diffs[str(temperature)] = max(
            abs(a - b) for s, r in zip(samples, lps) for a, b in zip(s.logprobs, r)
        )
        seen.append([s.token_ids for s in samples])
    every = [None] * c.ctx.dims.world_size
    dist.all_gather_object(every, (group.placement.hosts_engine, seen))
    result = {
        "layout": [tp, pp],
        "step": st.step,
        "stale_before_push": stale,
        "buckets": stats.buckets,
        "peak_bucket_bytes": stats.peak_bucket_bytes,
        "greedy_compared": compared,
        "greedy_tokens": sum(len(r) for r in ref.tokens),
        "logprob_max_diff": diffs,
        "hosts": [e[0] for e in every],
        "samples_same_on_all_ranks": all(e[1] == every[0][1] for e in every),
    }
    dpo_state_destroy()
    return result, group


def dpo_state_destroy() -> None:
    from metaapo_nemo.parallel import state

    state.destroy()


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    _keep_default_group()
    results, first = [], None
    for tp, pp in spec["layouts"]:
        result, group = run_layout(spec, tp, pp, first)
        first = first or group
        results.append(result)
        dist.barrier()
    first.shutdown()  # every rank: the engine on rank 0, vLLM's groups everywhere
    if dist.get_rank() == 0:
        Path(spec["out"]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
