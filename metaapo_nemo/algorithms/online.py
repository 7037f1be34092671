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

from metaapo_nemo.data.collate import epoch_order
from metaapo_nemo.data.preference import TokenizedPair
from metaapo_nemo.meta.learner import MetaLearner
from metaapo_nemo.models.policy import MegatronLM, MicroBatch
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.preference import ReferenceCache, reference_loss_fn
from metaapo_nemo.algorithms.rounds import OnlinePair


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
    microbatches: Sequence[MicroBatch],
    on_last_stage: bool,
) -> int:
    """`ref_logps_N` of 4-row round micro-batches, running the reference on ONLINE rows only.

    The offline rows' values come from `cache`, which the round's margin pass filled
    (`rounds.offline_margins(..., ref_cache=)`); only the rows of prompts with an online
    pair (rows 4i+2, 4i+3, trimmed to their own length) go through the reference. Equal to
    `attach_reference_logps` on all rows (tests/test_reference_cache.py). Every pipeline
    stage makes the same calls. Returns the number of rows the reference ran on.
    """
    if reference is None:
        return 0
    for mb in microbatches:
        missing = [int(i) for i in mb.extras["pair_index"].tolist() if int(i) not in cache]
        if missing:
            raise RuntimeError(f"reference cache lacks offline pairs {missing[:5]}: run the margin pass "
                               "with ref_cache before training the round")
    ran = 0
    for mb in microbatches:
        has = mb.extras["has_online"].bool().cpu()
        rows = [4 * i + j for i in torch.nonzero(has).flatten().tolist() for j in (2, 3)]
        online = None
        if rows:
            sub = _row_subset(mb, rows)
            online = reference.run([sub], reference_loss_fn, forward_only=True)
            ran += len(rows)
        if not on_last_stage:
            continue
        pair_idx = mb.extras["pair_index"].tolist()
        ref = torch.zeros(4 * len(pair_idx), dtype=torch.float32, device=mb.input_ids_NT.device)
        ref[0::4], ref[1::4] = _cached(cache, pair_idx, ref.device)
        if online:
            ref[torch.tensor(rows, device=ref.device)] = online[0]["seq_logps_N"].to(ref.dtype)
        mb.extras["ref_logps_N"] = ref
    return ran


def _cached(cache: ReferenceCache, pair_idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.tensor([cache._value(i) for i in pair_idx], dtype=torch.float64)
    return vals[:, 0].to(device, torch.float32), vals[:, 1].to(device, torch.float32)


def _row_subset(mb: MicroBatch, rows: list[int]) -> MicroBatch:
    """Plain (padded, causal) rows `rows` of `mb`, cut to their longest real length."""
    assert mb.attention_mask_N1TT is None and mb.seq_index_NT is None, "round rows are plain"
    sel = torch.tensor(rows, device=mb.input_ids_NT.device)
    mask = mb.loss_mask_NT[sel]
    cols = torch.nonzero(mask.sum(0)).flatten()
    t = int(cols.max()) + 1 if len(cols) else 1  # inputs up to the last target position
    t = min(t, mb.input_ids_NT.shape[1])
    return MicroBatch(mb.input_ids_NT[sel, :t], mb.labels_NT[sel, :t], mask[:, :t],
                      extras={"tokens": 0})


def sync_meta_learner(learner: MetaLearner, ctx: ParallelContext) -> None:
    """Broadcasts h_phi from the last pipeline stage (which records the buffer and steps)."""
    if ctx.dims.pp == 1:
        return
    src = dist.get_process_group_ranks(ctx.pp_group)[-1]
    for p in learner.net.parameters():
        buf = p.data.to(ctx.device)
        dist.broadcast(buf, src=src, group=ctx.pp_group)
        p.data.copy_(buf.cpu())


@torch.no_grad()
def copy_policy_into_reference(policy: MegatronLM, reference: MegatronLM) -> None:
    """reference <- policy (same layout, so a parameter-by-parameter copy)."""
    for src, dst in zip(policy.modules(), reference.modules()):
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            dst_params[name].copy_(p.detach().to(dst_params[name].device))
