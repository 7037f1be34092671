"""MetaAPO round plumbing around the rollout stage (every function is called on EVERY rank).

- `round_slices`: the epoch's seeded prompt order cut into rounds.
- `online_pairs`: refit + generate K for the selected prompts + reward-model annotation,
  scoring split over ranks and gathered, so every rank ends with the same pairs.
- `sync_meta_learner`: h_phi from the last pipeline stage to all stages.
- `copy_policy_into_reference`: the release's per-round reference.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from metaapo_nemo.algorithms.rounds import OnlinePair, RoundItem
from metaapo_nemo.data.collate import epoch_order
from metaapo_nemo.data.preference import TokenizedPair
from metaapo_nemo.meta.learner import MetaLearner
from metaapo_nemo.models.policy import MegatronLM, MicroBatch
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.batching import to_microbatches
from metaapo_nemo.trainer.preference import ReferenceCache, reference_loss_fn
from metaapo_nemo.trainer.rows import RowLayout


def round_slices(num_pairs: int, round_size: int, global_batch: int, seed: int, epoch: int,
                 shuffle: bool) -> list[list[int]]:
    """Indices into the pair list per round. Each round is cut down to a multiple of the
    global batch; the leftover tail of the epoch (less than one global batch) is dropped."""
    order = epoch_order(num_pairs, seed, epoch) if shuffle else list(range(num_pairs))
    out = []
    for start in range(0, len(order), round_size):
        chunk = order[start:start + round_size]
        chunk = chunk[: len(chunk) - len(chunk) % global_batch]
        if chunk:
            out.append(chunk)
    return out


@dataclass
class RolloutReport:
    pairs: dict[int, OnlinePair]
    counters: object  # AnnotationCounters
    refit_s: float = 0.0
    generate_s: float = 0.0
    score_s: float = 0.0
    generated_tokens: int = 0
    rm_chosen_mean: float = float("nan")
    rm_rejected_mean: float = float("nan")


def online_pairs(
    selected: Sequence[TokenizedPair],
    rollout,
    reward,
    policy: MegatronLM,
    settings,
    cfg,
    round_idx: int,
    policy_step: int,
    ctx: ParallelContext,
) -> RolloutReport:
    """Refit -> K samples per selected prompt -> RM scores -> best/worst pairs (all ranks)."""
    from metaapo_nemo.rollout.generator import PromptBatch
    from metaapo_nemo.rollout.group import split_indices
    from metaapo_nemo.rollout.pairs import AnnotationCounters, annotate

    counters = AnnotationCounters()
    if not selected:
        return RolloutReport({}, counters)
    t0 = time.perf_counter()
    rollout.wake()
    rollout.push_megatron(policy.modules(), policy.arch, policy_step, cfg.rollout.refit_bucket_mb << 20)
    t1 = time.perf_counter()
    batch = PromptBatch.build([p.prompt_ids for p in selected], [p.index for p in selected],
                              round=round_idx, messages=[p.messages() for p in selected])
    groups = rollout.generate(batch, settings, policy_step)
    rollout.sleep()
    t2 = time.perf_counter()
    # Score a slice per rank, then share: every rank ends with all pairs and counters.
    world = ctx.dims.world_size
    mine = split_indices(len(batch), world, ctx.rank)
    pairs, counters = annotate(batch.select(mine), [groups[i] for i in mine], reward,
                               cfg.rollout.truncated, cfg.reward.batch_size, policy_step)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (pairs, counters.as_dict()))
        pairs = [p for part, _ in gathered for p in part]
        counters = AnnotationCounters()
        for _, c in gathered:
            counters.add(AnnotationCounters(**c))
    t3 = time.perf_counter()
    by_key = {
        p.key: OnlinePair(tuple(p.chosen.token_ids), tuple(p.rejected.token_ids), p.chosen_score, p.rejected_score)
        for p in pairs
    }
    chosen = [p.chosen_reward for p in by_key.values()]
    rejected = [p.rejected_reward for p in by_key.values()]
    return RolloutReport(
        by_key, counters, refit_s=t1 - t0, generate_s=t2 - t1, score_s=t3 - t2,
        generated_tokens=sum(len(s.token_ids) for g in groups for s in g.samples),
        rm_chosen_mean=sum(chosen) / len(chosen) if chosen else float("nan"),
        rm_rejected_mean=sum(rejected) / len(rejected) if rejected else float("nan"),
    )


def attach_reference_logps(reference: MegatronLM | None, microbatches: Sequence[MicroBatch]) -> None:
    """Reference sequence log-probs of every row (last pipeline stage keeps them)."""
    if reference is None:
        return
    outs = reference.run(microbatches, reference_loss_fn, forward_only=True)
    for mb, out in zip(microbatches, outs):
        mb.extras["ref_logps_N"] = out["seq_logps_N"]


def attach_round_reference(
    reference: MegatronLM | None,
    cache: ReferenceCache,
    items: Sequence[RoundItem],
    microbatches: Sequence[MicroBatch],
    ctx: ParallelContext,
    micro_pairs: int,
    pad_id: int,
    layout: RowLayout | None = None,
) -> int:
    """`ref_logps_N` [4B] of round micro-batches, running the reference on ONLINE pairs only.

    The offline values come from `cache`, which the round's margin pass filled
    (`rounds.offline_margins(..., ref_cache=)`); the online pairs of `items` (this rank's
    share of the step) go through the reference once, as DPO pairs in the same `layout`.
    Equal to `attach_reference_logps` on all rows (tests/test_reference_cache.py). Every
    pipeline stage makes the same calls (under PP the online pairs are padded with repeats
    to whole micro-batches: every micro-batch of a schedule has the same rows). Returns
    the number of online pairs the reference ran on.
    """
    if reference is None:
        return 0
    missing = [it.index for it in items if it.index not in cache]
    if missing:
        raise RuntimeError(f"reference cache lacks offline pairs {missing[:5]}: run the margin pass "
                           "with ref_cache before training the round")
    online = [it.online_as_pair() for it in items if it.online is not None]
    values: dict[int, torch.Tensor] = {}
    if online:
        run = online
        if ctx.dims.pp > 1 and len(online) % micro_pairs:
            run = online + [online[-1]] * (micro_pairs - len(online) % micro_pairs)
        mbs = to_microbatches(run, micro_pairs, pad_id, ctx.device, layout)
        for mb, out in zip(mbs, reference.run(mbs, reference_loss_fn, forward_only=True)):
            seq = out["seq_logps_N"]
            for j, idx in enumerate(mb.extras["pair_index"].tolist()):
                values[idx] = seq[2 * j:2 * j + 2]
    if not ctx.is_last_stage:
        return len(online)
    for mb in microbatches:
        pair_idx = mb.extras["pair_index"].tolist()
        ref = torch.zeros(4 * len(pair_idx), dtype=torch.float32, device=mb.input_ids_NT.device)
        ref[0::4], ref[1::4] = _cached(cache, pair_idx, ref.device)
        for j, idx in enumerate(pair_idx):
            if idx in values:
                ref[4 * j + 2:4 * j + 4] = values[idx].to(ref)
        mb.extras["ref_logps_N"] = ref
    return len(online)


def _cached(cache: ReferenceCache, pair_idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.tensor([cache._value(i) for i in pair_idx], dtype=torch.float64)
    return vals[:, 0].to(device, torch.float32), vals[:, 1].to(device, torch.float32)


def sync_meta_learner(learner: MetaLearner, ctx: ParallelContext,
                      metrics: dict[str, float] | None = None) -> dict[str, float] | None:
    """h_phi, its optimiser state and step count from the last pipeline stage (which records
    the buffer and steps) to every stage, so every rank holds the same meta-learner (and a
    checkpoint of any rank resumes it, in any layout). Returns the last stage's meta-step
    `metrics` on every rank (the first stage logs them)."""
    if ctx.dims.pp == 1:
        return metrics
    src = dist.get_process_group_ranks(ctx.pp_group)[-1]
    box = [{"net": learner.net.state_dict(), "optimizer": learner.optimizer.state_dict(),
            "steps": learner.steps, "metrics": metrics} if ctx.is_last_stage else None]
    dist.broadcast_object_list(box, src=src, group=ctx.pp_group_gloo)
    if not ctx.is_last_stage:
        learner.net.load_state_dict(box[0]["net"])
        learner.optimizer.load_state_dict(box[0]["optimizer"])
        learner.steps = int(box[0]["steps"])
    return box[0]["metrics"]


@torch.no_grad()
def copy_policy_into_reference(policy: MegatronLM, reference: MegatronLM) -> None:
    """reference <- policy (same layout, so a parameter-by-parameter copy)."""
    for src, dst in zip(policy.modules(), reference.modules()):
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            dst_params[name].copy_(p.detach().to(dst_params[name].device))
