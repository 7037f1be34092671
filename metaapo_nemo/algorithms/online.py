"""MetaAPO round plumbing around the rollout stage (every function is called on EVERY rank).

- `round_slices`: the epoch's seeded prompt order cut into rounds.
- `online_pairs`: refit + generate K for the selected prompts + reward-model annotation,
  scoring split over ranks and gathered, so every rank ends with the same pairs.
- `sync_meta_learner`: h_phi from the last pipeline stage to all stages.
- `copy_policy_into_reference`: the release's per-round reference.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from metaapo_nemo.algorithms.rounds import OnlinePair, RoundItem, gather_to_all
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
    refit_bytes: int = 0  # what the refit moved into this rank's engine (the stream's bytes)
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
    check: Callable[[str], None] = lambda where: None,
) -> RolloutReport:
    """Refit -> K samples per selected prompt -> RM scores -> best/worst pairs (all ranks).

    The selected prompts go in chunks of ``metaapo.prompts_per_chunk`` (generate, then score);
    `check(where)` is called by every rank at the same points (after the refit, after each
    chunk's generation and its scoring): the loop's preemption check point, which may raise to
    abandon the round.
    """
    from metaapo_nemo.rollout.generator import PromptBatch
    from metaapo_nemo.rollout.pairs import AnnotationCounters

    counters = AnnotationCounters()
    if not selected:
        return RolloutReport({}, counters)
    t0 = time.perf_counter()
    rollout.wake()
    if cfg.lora is not None and cfg.lora.refit == "adapters":  # the adapters alone, over the base
        stats = rollout.push_lora(policy.modules(), policy.arch, policy.build.lora, policy_step,
                                  str(cfg.model.path or ""))
    else:
        stats = rollout.push_megatron(policy.modules(), policy.arch, policy_step, cfg.rollout.refit_bucket_mb << 20)
    check("refit")
    t1 = time.perf_counter()
    batch = PromptBatch.build([p.prompt_ids for p in selected], [p.index for p in selected],
                              round=round_idx, messages=[p.messages() for p in selected])
    # What a rank keeps of a round (planner: host plan): the round's pairs as token ids and
    # scores (every rank: the round's items and checkpoint hold them all), and the samples of
    # prompts still without a pair (a tie refill adds K to them); each chunk's samples go
    # once it is scored.
    by_key: dict[int, OnlinePair] = {}
    by_group: dict[int, object] = {}  # PromptSamples of prompts without a pair, by key
    generated, generate_s, score_s = 0, 0.0, 0.0
    known: dict[tuple[int, int], float] = {}  # every rank's scores, by (prompt key, sample index)
    step = cfg.metaapo.prompts_per_chunk or len(batch)
    for start in range(0, len(batch), step):  # seeds are per sample: the split changes no sample
        chunk = batch.select(range(start, min(start + step, len(batch))))
        t_gen = time.perf_counter()
        got = rollout.generate(chunk, settings, policy_step)
        rollout.sleep()  # the engine sleeps while the reward model scores (the memory plan's order)
        check("generate")
        t_score = time.perf_counter()
        new_pairs, c = _annotate_shared(chunk, got, reward, cfg, policy_step, ctx, known)
        by_key |= new_pairs
        generated += sum(len(s.token_ids) for g in got for s in g.samples)
        if cfg.rollout.tie_refills:
            by_group |= {g.key: g for g in got if g.key not in new_pairs}
        del got
        counters.add(c)
        check("score")
        generate_s += t_score - t_gen
        score_s += time.perf_counter() - t_score
    for attempt in range(1, cfg.rollout.tie_refills + 1):  # K more samples for prompts without a pair
        missing = [i for i, k in enumerate(batch.keys) if k not in by_key]
        if not missing:
            break
        t_gen = time.perf_counter()
        sub = batch.select(missing)
        extra = rollout.generate(sub, refill_settings(settings, round_idx, attempt), policy_step)
        rollout.sleep()  # generate wakes it again (the weights pushed for policy_step stay)
        t_score = time.perf_counter()
        generated += sum(len(s.token_ids) for g in extra for s in g.samples)
        for g in extra:  # sample indices continue after the prompt's earlier samples
            old = by_group[g.key]
            more = tuple(dataclasses.replace(s, k=len(old.samples) + j) for j, s in enumerate(g.samples))
            by_group[g.key] = dataclasses.replace(old, samples=old.samples + more)
        new_pairs, c = _annotate_shared(sub, [by_group[k] for k in sub.keys], reward, cfg, policy_step, ctx,
                                        known)
        by_key |= new_pairs
        for k in new_pairs:
            del by_group[k]
        new_samples = sum(len(g.samples) for g in extra)
        # cost adds up; the outcome of the refilled prompts is the new one
        counters.prompts_generated += len(missing)
        counters.samples_generated += new_samples
        counters.samples_truncated += sum(s.truncated for g in extra for s in g.samples)
        counters.samples_scored += c.samples_scored
        counters.refill_prompts += len(missing)
        counters.refill_samples += new_samples
        counters.pairs += c.pairs
        counters.ties_all_equal, counters.ties_same_text = c.ties_all_equal, c.ties_same_text
        counters.too_few_candidates = c.too_few_candidates
        generate_s += t_score - t_gen
        score_s += time.perf_counter() - t_score
    chosen = [p.chosen_reward for p in by_key.values()]
    rejected = [p.rejected_reward for p in by_key.values()]
    return RolloutReport(
        by_key, counters, refit_s=t1 - t0, refit_bytes=stats.bytes, generate_s=generate_s, score_s=score_s,
        generated_tokens=generated,
        rm_chosen_mean=sum(chosen) / len(chosen) if chosen else float("nan"),
        rm_rejected_mean=sum(rejected) / len(rejected) if rejected else float("nan"),
    )


def chunk_microbatches(mbs: list, prompts: int, per_chunk: int | None, ctx: ParallelContext) -> list[list]:
    """This rank's micro-batches in contiguous chunks, the SAME number of chunks on every rank
    (each chunk ends in collectives: the margins' gather, the preemption check): about
    `prompts / per_chunk` of them, never more than the fewest micro-batches any rank has
    (packed layouts may give ranks different counts). None: one chunk."""
    from metaapo_nemo.rollout.group import split_indices

    wanted = 1 if per_chunk is None else -(-prompts // per_chunk)
    count = torch.tensor([min(wanted, len(mbs))], dtype=torch.int64, device=ctx.device)
    if ctx.dims.world_size > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
    n = max(1, int(count.item()))
    return [[mbs[i] for i in split_indices(len(mbs), n, k)] for k in range(n)]


def refill_settings(settings, round_idx: int, attempt: int):
    """The sampling settings of tie refill `attempt` (>= 1): a base seed of its own, so its
    samples differ from the first draw's and from other attempts', and reruns repeat them."""
    from metaapo_nemo.rollout.generator import derive_seed

    if settings.seed is None:
        return settings
    return dataclasses.replace(settings, seed=derive_seed(settings.seed, round_idx, -attempt, -1))


def _annotate_shared(batch, groups, reward, cfg, policy_step: int, ctx: ParallelContext,
                     known: dict[tuple[int, int], float]):
    """`annotate` with the prompts split over ranks and the results shared: every rank ends
    with all pairs (as `OnlinePair`s by prompt key: token ids and scores, not the samples'
    texts and log-probs), the summed counters and every new score (in `known`)."""
    from metaapo_nemo.rollout.group import split_indices
    from metaapo_nemo.rollout.pairs import AnnotationCounters, annotate

    world = ctx.dims.world_size
    mine = split_indices(len(batch), world, ctx.rank)
    before = set(known)
    found, counters = annotate(batch.select(mine), [groups[i] for i in mine], reward,
                               cfg.rollout.truncated, cfg.reward.batch_size, policy_step, known)
    pairs = [(p.key, OnlinePair(tuple(p.chosen.token_ids), tuple(p.rejected.token_ids), p.chosen_score,
                                p.rejected_score)) for p in found]
    if world > 1:
        new = {k: v for k, v in known.items() if k not in before}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (pairs, counters.as_dict(), new))
        pairs = [p for part, _, _ in gathered for p in part]
        counters = AnnotationCounters()
        for _, c, scores in gathered:
            counters.add(AnnotationCounters(**c))
            known.update(scores)
    return dict(pairs), counters


def attach_reference_logps(reference: MegatronLM | None, microbatches: Sequence[MicroBatch]) -> None:
    """Reference sequence log-probs of every row (last pipeline stage keeps them)."""
    if reference is None:
        return
    outs = reference.run(microbatches, reference_loss_fn, forward_only=True)
    for mb, out in zip(microbatches, outs):
        mb.extras["ref_logps_N"] = out["seq_logps_N"]


def with_online_reference(
    reference: MegatronLM | None,
    items: Sequence[RoundItem],
    ctx: ParallelContext,
    micro_pairs: int,
    pad_id: int,
    layout: RowLayout | None = None,
) -> list[RoundItem]:
    """The round's items with the reference log-probs of their online pairs, on every rank.

    Once per round, after annotation (the reference is fixed within a round): each DP rank
    runs the reference over its contiguous share of the round's online pairs (as DPO pairs in
    the run's `layout`; padded with repeats to whole micro-batches under PP, where every
    micro-batch of a schedule has the same rows), and the values are gathered to every rank
    (DP all-gather, PP broadcast: two floats per pair). The round's training steps then run
    no reference at all (`attach_round_reference`), like DPO steps on a cached reference, and
    a checkpoint of the round (its items) holds the values, so a resumed round needs no pass.
    """
    online = [it for it in items if it.online is not None]
    if reference is None or not online:
        return list(items)
    share = -(-len(online) // ctx.dims.dp)
    mine = [it.online_as_pair() for it in online[ctx.dp_rank * share:(ctx.dp_rank + 1) * share]]
    online_cache = ReferenceCache()  # this round's online pairs (the run's cache holds offline ones)
    if mine:
        run = mine
        if ctx.dims.pp > 1 and len(mine) % micro_pairs:
            run = mine + [mine[-1]] * (micro_pairs - len(mine) % micro_pairs)
        online_cache.fill(reference, to_microbatches(run, micro_pairs, pad_id, ctx.device, layout))
    values = gather_to_all(online_cache.entries([p.index for p in mine]), ctx)
    return [it if it.online is None else
            RoundItem(it.pair, dataclasses.replace(it.online, ref_chosen=values[it.index][0],
                                                   ref_rejected=values[it.index][1]))
            for it in items]


def attach_round_reference(cache: ReferenceCache, items: Sequence[RoundItem],
                           microbatches: Sequence[MicroBatch], on_last_stage: bool) -> None:
    """`ref_logps_N` [4B] of round micro-batches without running the reference: offline values
    from `cache` (the round's margin pass filled it), online values from the items
    (`with_online_reference`). Placeholders of absent pairs (no online pair; offline rows left
    out) get 0 (never read)."""
    missing = [it.index for it in items if it.train_offline and it.index not in cache]
    if missing:
        raise RuntimeError(f"reference cache lacks offline pairs {missing[:5]}: run the margin pass "
                           "with ref_cache before training the round")
    if not on_last_stage:
        return
    by_index = {it.index: it for it in items}
    for mb in microbatches:
        pair_idx = mb.extras["pair_index"].tolist()
        ref = torch.zeros(4 * len(pair_idx), dtype=torch.float64)
        offline = []
        for j, idx in enumerate(pair_idx):
            item = by_index[idx]
            if item.train_offline:
                offline.append(j)
            on = item.online
            if on is not None:
                if on.ref_chosen is None or on.ref_rejected is None:
                    raise RuntimeError(f"online pair of prompt {idx} has no reference values: run "
                                       "with_online_reference on the round's items first")
                ref[4 * j + 2], ref[4 * j + 3] = on.ref_chosen, on.ref_rejected
        if offline:
            chosen, rejected = _cached(cache, [pair_idx[j] for j in offline], ref.device)
            rows = torch.tensor(offline, dtype=torch.long) * 4
            ref[rows], ref[rows + 1] = chosen, rejected
        mb.extras["ref_logps_N"] = ref.to(mb.input_ids_NT.device, torch.float32)


def _cached(cache: ReferenceCache, pair_idx: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    vals = torch.tensor([cache._value(i) for i in pair_idx], dtype=torch.float64)
    return vals[:, 0].to(device), vals[:, 1].to(device)


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
    """reference <- policy (same layout, so a parameter-by-parameter copy; a LoRA run's
    reference copies the adapters only)."""
    if hasattr(reference, "copy_from"):
        reference.copy_from(policy)  # type: ignore[union-attr]
        return
    for src, dst in zip(policy.modules(), reference.modules()):
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            dst_params[name].copy_(p.detach().to(dst_params[name].device))
