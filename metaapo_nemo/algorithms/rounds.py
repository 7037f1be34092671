"""MetaAPO round pieces: margin pass, round items, the meta-weighted training step.

Legend: B prompts in a micro-batch; Q = 4B logical sequences, per prompt i:
    sequence 4i   offline chosen      sequence 4i+1 offline rejected
    sequence 4i+2 online chosen       sequence 4i+3 online rejected
A round item is a row-layout unit with four responses (`trainer.rows.Unit`), so MetaAPO's
rows go through the same layouts as DPO pairs (pad / bucket / pack / shared prompt). A
prompt without an online pair has its two online responses absent: placeholder rows
(prompt + one pad token, loss mask 0) in the one-sequence-per-row layouts, no tokens in
the others. Likewise the offline responses of a prompt whose offline term has weight 0
(``metaapo.weights=zero``, i.e. Online DPO: `RoundItem.train_offline` False) are absent, so
its steps cost what online pairs alone cost. All four sequences of a prompt stay in one
micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from metaapo_nemo.data.preference import TokenizedPair
from metaapo_nemo.losses import PairLogps, PreferenceLoss
from metaapo_nemo.losses.meta_weighted import mix_losses
from metaapo_nemo.models.policy import LossFn, MegatronLM, MicroBatch
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.batching import to_microbatches
from metaapo_nemo.trainer.preference import ReferenceCache, reference_loss_fn
from metaapo_nemo.trainer.rows import RowLayout

@dataclass(frozen=True)
class OnlinePair:
    """Best and worst of K on-policy samples for one prompt, by reward, and (once the round's
    reference pass ran, `algorithms.online.with_online_reference`) their reference
    sequence log-probs."""

    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    chosen_reward: float
    rejected_reward: float
    ref_chosen: float | None = None
    ref_rejected: float | None = None


@dataclass(frozen=True)
class RoundItem:
    """One prompt of a round: its offline pair and, if it was sampled, its online pair."""

    pair: TokenizedPair  # the offline pair; pair.index is the prompt id
    online: OnlinePair | None = None
    # False: the offline responses are left out of the step's rows (their loss weight is 0;
    # set per step by the algorithm, never checkpointed)
    train_offline: bool = True

    @property
    def index(self) -> int:
        return self.pair.index

    @property
    def prompt_ids(self) -> tuple[int, ...]:
        return self.pair.prompt_ids

    @property
    def responses(self) -> tuple[tuple[int, ...] | None, ...]:
        """(offline chosen, offline rejected, online chosen, online rejected); None = absent."""
        on, off = self.online, self.train_offline
        return (self.pair.chosen_ids if off else None, self.pair.rejected_ids if off else None,
                None if on is None else on.chosen_ids, None if on is None else on.rejected_ids)

    def online_as_pair(self) -> TokenizedPair:
        """The online pair as a DPO pair of the same prompt (e.g. for a reference pass)."""
        assert self.online is not None
        return TokenizedPair(self.pair.index, self.pair.prompt_ids, self.online.chosen_ids,
                             self.online.rejected_ids)


# ----------------------------------------------------------------- collation


def round_microbatches(items: Sequence[RoundItem], micro_items: int, pad_id: int, device: torch.device,
                       layout: RowLayout | None = None) -> list[MicroBatch]:
    """Round items of one rank -> micro-batches in `layout` (None = "pad"), with
    ``extras["has_online"]`` and ``extras["has_offline"]`` [B] in each micro-batch's prompt order."""
    by_index = {it.index: it for it in items}
    assert len(by_index) == len(items), "a round holds each prompt once"
    mbs = to_microbatches(items, micro_items, pad_id, device, layout)
    for mb in mbs:
        order = [by_index[int(i)] for i in mb.extras["pair_index"].tolist()]
        mb.extras["has_online"] = torch.tensor([it.online is not None for it in order], device=device)
        mb.extras["has_offline"] = torch.tensor([it.train_offline for it in order], device=device)
    return mbs


def collate_round(items: Sequence[RoundItem], pad_id: int, device: torch.device) -> MicroBatch:
    """All `items` as ONE plain padded micro-batch (4 rows per prompt, the reference layout)."""
    (mb,) = round_microbatches(items, len(items), pad_id, device)
    return mb


def split_pairs_view(mb: MicroBatch, logps_NT: torch.Tensor) -> tuple[PairLogps, PairLogps]:
    """Offline and online PairLogps of a 4-row-per-prompt micro-batch."""
    seq = mb.sequence_logps(logps_NT)
    length = mb.sequence_lengths().clamp(min=1.0)  # placeholders: 0 tokens -> 1 (finite SimPO)
    ref = mb.extras.get("ref_logps_N")

    def view(a: int, b: int) -> PairLogps:
        return PairLogps(
            seq[a::4], seq[b::4], length[a::4], length[b::4],
            None if ref is None else ref[a::4], None if ref is None else ref[b::4],
        )

    return view(0, 1), view(2, 3)


# ----------------------------------------------------------------- loss


Weigher = Callable[[torch.Tensor], torch.Tensor]  # m_off_B -> w_B (detached)
Recorder = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]  # (m_off, L_off, L_on)


def metaapo_loss_fn(
    loss: PreferenceLoss,
    weigher: Weigher,
    num_prompts_global: int,
    unselected: str,
    record: Recorder | None = None,
) -> LossFn:
    """Last-stage callback: w recomputed from the CURRENT policy's offline margin, detached;
    loss_i = w L_off + (1 - w) L_on for prompts with an online pair, L_off (or nothing) else.
    Detached (m_off, L_off, L_on) of prompts with an online pair go to the meta buffer.
    """

    def fn(mb: MicroBatch, logps_NT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        off, on = split_pairs_view(mb, logps_NT)
        has = mb.extras["has_online"].bool()
        has_off = mb.extras["has_offline"].bool()
        m_off, m_on = loss.margin(off), loss.margin(on)
        l_off, l_on = loss.pair_loss(m_off), loss.pair_loss(m_on)
        w = weigher(m_off.detach()).to(l_off.dtype)
        if not bool(has_off.all()):  # offline rows left out: only where w is 0 and an online pair exists
            assert bool((has | has_off).all()) and not bool(w[~has_off].any()), "offline rows left out wrongly"
            l_off = torch.where(has_off, l_off, torch.zeros_like(l_off))
        mixed = mix_losses(l_off, l_on, w, has, num_prompts_global, unselected)
        rec = has & has_off
        if record is not None and bool(rec.any()):
            record(m_off.detach()[rec], l_off.detach()[rec], l_on.detach()[rec])
        f = lambda x: x.detach().float().sum().reshape(())  # noqa: E731
        zero = torch.zeros_like(m_off)
        stats = {
            "loss": mixed.loss.detach().clone(),
            "prompts": f(mixed.contributes_B),
            "online_pairs": f(has),
            "offline_pairs": f(has_off),
            "loss_off_sum": f(l_off),
            "loss_on_sum": f(torch.where(has, l_on, torch.zeros_like(l_on))),
            "margin_off_sum": f(torch.where(has_off, m_off, zero)),
            "margin_on_sum": f(torch.where(has, m_on, torch.zeros_like(m_on))),
            "off_correct": f((m_off > 0) & has_off),
            "on_correct": f((m_on > 0) & has),
            "w_sum": f(w),
            "response_tokens": f(mb.loss_mask_NT),
        }
        return mixed.loss, stats

    return fn


ROUND_STAT_KEYS = ("loss", "prompts", "online_pairs", "offline_pairs", "loss_off_sum", "loss_on_sum",
                   "margin_off_sum", "margin_on_sum", "off_correct", "on_correct", "w_sum", "response_tokens")


def sum_round_stats(per_mb: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    if not per_mb:
        return torch.zeros(len(ROUND_STAT_KEYS), dtype=torch.float64)
    return torch.stack([torch.stack([mb[k].double() for k in ROUND_STAT_KEYS]) for mb in per_mb]).sum(0)


def finalize_round_stats(total: torch.Tensor, total_prompts_in_batch: int) -> dict[str, float]:
    s = dict(zip(ROUND_STAT_KEYS, total.tolist()))
    n = max(float(total_prompts_in_batch), 1.0)
    on = max(s["online_pairs"], 1.0)
    off = s["offline_pairs"]  # = n unless offline rows were left out (Online DPO)

    def per_off(key: str) -> float:
        return s[key] / off if off else float("nan")

    return {
        "loss": s["loss"],
        "loss_offline": per_off("loss_off_sum"),
        "loss_online": s["loss_on_sum"] / on if s["online_pairs"] else float("nan"),
        "margin_offline": per_off("margin_off_sum"),
        "margin_online": s["margin_on_sum"] / on if s["online_pairs"] else float("nan"),
        "reward_accuracy": per_off("off_correct"),
        "reward_accuracy_online": s["on_correct"] / on if s["online_pairs"] else float("nan"),
        "w_mean": s["w_sum"] / n,
        "online_fraction": s["online_pairs"] / n,
        "prompts": s["prompts"],
        "response_tokens": s["response_tokens"],
    }


# ----------------------------------------------------------------- margin pass


def gather_to_all(local: dict, ctx: ParallelContext) -> dict:
    """Per-prompt values of one DP shard (computed on the last stage) -> every prompt's value
    on every rank: DP all-gather on the last stage, then a broadcast from it to the other
    stages."""
    merged = dict(local)
    if ctx.dims.dp > 1 and ctx.is_last_stage:
        parts: list[dict[int, float]] = [{} for _ in range(ctx.dims.dp)]
        dist.all_gather_object(parts, local, group=ctx.dp_group_gloo)
        merged = {k: v for p in parts for k, v in p.items()}
    if ctx.dims.pp > 1:
        ranks = dist.get_process_group_ranks(ctx.pp_group)
        box = [merged]
        dist.broadcast_object_list(box, src=ranks[-1], group=ctx.pp_group_gloo)
        merged = box[0]
    return merged


def offline_margins(
    policy: MegatronLM,
    reference: MegatronLM | None,
    loss: PreferenceLoss,
    microbatches: Sequence[MicroBatch],
    ctx: ParallelContext,
    ref_cache: ReferenceCache | None = None,
) -> dict[int, float]:
    """m_off per prompt id with the current policy and reference (forward only), on all ranks.

    `microbatches` are this DP rank's offline pairs (2 per pair, as in offline DPO; any
    `RowLayout`). With `ref_cache`, the reference runs only on micro-batches with uncached
    pairs and its values go INTO the cache, so the round's training steps attach them
    instead of running the reference again: one reference forward per offline pair per
    reference version (the cache is invalidated when the reference changes).
    """
    pol = policy.run(microbatches, reference_loss_fn, forward_only=True)
    if reference is not None and ref_cache is not None:
        todo = [mb for mb in microbatches if not ref_cache.has_all([mb])]
        if todo:  # the same micro-batches on every pipeline stage
            ref_cache.fill(reference, todo)
        ref_cache.attach(microbatches, ctx.is_last_stage)
        share_reference_values(ref_cache, microbatches, ctx)
        ref = [None] * len(pol)
    elif reference is not None:
        ref = reference.run(microbatches, reference_loss_fn, forward_only=True)
    else:
        ref = [None] * len(pol)
    local: dict[int, float] = {}
    for mb, p_out, r_out in zip(microbatches, pol, ref):
        seq = p_out["seq_logps_N"]
        if r_out is not None:
            mb.extras["ref_logps_N"] = r_out["seq_logps_N"]
        m = loss.margin(_pairs_from_seq(mb, seq))
        for idx, value in zip(mb.extras["pair_index"].tolist(), m.tolist()):
            local[idx] = float(value)
    return gather_to_all(local, ctx)


def share_reference_values(cache: ReferenceCache, microbatches: Sequence[MicroBatch],
                           ctx: ParallelContext) -> None:
    """Every DP rank of a stage gets the reference values of the WHOLE round.

    The margin pass computes one DP shard of the round per rank, but the round's training
    steps deal the prompts out in another order, so a rank trains on pairs of other shards:
    without this, DP > 1 stopped at the first step ("reference cache lacks offline pairs").
    Two floats per pair; values exist on the last stage, keys on every stage.
    """
    if ctx.dims.dp == 1:
        return
    keys = [int(i) for mb in microbatches for i in mb.extras["pair_index"].tolist()]
    parts: list[dict] = [{} for _ in range(ctx.dims.dp)]
    dist.all_gather_object(parts, cache.entries(keys), group=ctx.dp_group_gloo)
    for part in parts:
        cache.update(part)


def _pairs_from_seq(mb: MicroBatch, seq_N: torch.Tensor) -> PairLogps:
    length = mb.sequence_lengths()
    ref = mb.extras.get("ref_logps_N")
    return PairLogps(
        seq_N[0::2], seq_N[1::2], length[0::2], length[1::2],
        None if ref is None else ref[0::2], None if ref is None else ref[1::2],
    )
