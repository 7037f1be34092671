"""MetaAPO (arXiv 2509.23371) as an algorithm of the one loop; Online DPO and the paper's
ablations are its settings (`metaapo.sampling` / `weights` / `meta_update` / `unselected`).

Per round: offline margins with the current policy and reference -> meta weights w ->
seeded selection (u > w) -> weight push into vLLM + K samples for the selected prompts ->
reward model -> best/worst online pairs -> steps with w * L_off + (1 - w) * L_on -> a
meta-learner step every T_meta optimiser steps (a loop callback).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from metaapo_nemo import preempt
from metaapo_nemo.algorithms import online as O
from metaapo_nemo.algorithms.rounds import (
    RoundItem,
    finalize_round_stats,
    metaapo_loss_fn,
    offline_margins,
    round_microbatches,
    sum_round_stats,
)
from metaapo_nemo.checkpoint_io import rng_state, set_rng_state
from metaapo_nemo.config.schema import Config
from metaapo_nemo.data.collate import epoch_order
from metaapo_nemo.meta import MetaLearner, MetaSettings, MetaUpdateCallback, select_for_sampling
from metaapo_nemo.trainer.algorithm import StepWork
from metaapo_nemo.trainer.batching import StepPlan, rank_microbatches, to_microbatches
from metaapo_nemo.trainer.callbacks import TrainState
from metaapo_nemo.trainer.metrics import reduce_stats
from metaapo_nemo.trainer.resilience import Preempted


def total_steps(num_pairs: int, cfg: Config) -> int:
    from metaapo_nemo.trainer.setup import metaapo_total_steps

    return metaapo_total_steps(num_pairs, cfg)


@dataclass
class Position:
    """Where the loop is: what a checkpoint must hold to continue exactly (with the models)."""

    epoch: int = 0
    round_in_epoch: int = 0  # rounds of this epoch started (the current one included)
    round_idx: int = 0  # rounds started in the run
    next_start: int = 0  # items of the current round already trained on
    seen: int = 0
    annotated: int = 0
    counters: dict = field(default_factory=dict)  # AnnotationCounters of the run
    round_record: dict = field(default_factory=dict)  # the current round's rounds.jsonl fields so far

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


class RoundState:
    """The current round's items (offline pair + online pair per prompt), so a resumed round
    needs no new rollout. Items are kept in round order; the step order is derived."""

    def __init__(self, pairs: list):
        self.by_index = {p.index: p for p in pairs}
        self.items: list[RoundItem] | None = None

    def state_dict(self) -> dict:
        return {"round_items": None if self.items is None
                else [(it.pair.index, it.online) for it in self.items]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["round_items"]
        self.items = None if saved is None else [RoundItem(self.by_index[i], on) for i, on in saved]


def _digest(indices) -> str:
    """A short fingerprint of a set of prompt ids (which prompts a round sampled): layouts and
    resumes must select the same prompts, and a whole list would not fit a log line at scale."""
    return hashlib.sha1(",".join(map(str, sorted(indices))).encode()).hexdigest()[:16]


class MetaAPO:
    """The MetaAPO algorithm over a built `Run` (`metaapo_nemo.run.Run`)."""

    name = "metaapo"

    def __init__(self, run: Any):
        from metaapo_nemo.rollout.generator import SamplingSettings

        self.run = run
        cfg, ctx, m = run.cfg, run.ctx, run.cfg.metaapo
        self.learner = MetaLearner(
            MetaSettings(hidden=m.meta_hidden, init=m.meta_init, lr=m.meta_lr,
                         weight_decay=m.meta_weight_decay, clip_grad=m.meta_clip_grad,
                         beta_in=m.beta_in, seed=cfg.run.seed),
            dp_group=ctx.dp_group_gloo)
        self.rollout = self.reward = None
        if m.sampling != "none":
            from metaapo_nemo.config.loader import resolve_repo_path
            from metaapo_nemo.reward import build_reward_model
            from metaapo_nemo.rollout.group import build_rollout_group

            preempt.reached("engine")
            self.rollout = build_rollout_group(cfg, str(run.model_dir), ctx, initial_step=0)
            from metaapo_nemo.trainer.setup import main_first

            cache = str(resolve_repo_path(cfg.run.cache_dir))  # a tiny RM is built there once
            preempt.reached("reward")
            self.reward = main_first(ctx, lambda: build_reward_model(cfg.reward, cache_dir=cache))
        self.sampling = SamplingSettings.from_config(cfg.rollout)
        self.plan = StepPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, ctx.dims.dp)
        # h_phi is read only for meta sampling or meta weights: otherwise (Online DPO, or random
        # / all sampling with constant weights) the round runs no margin pass and h_phi never
        # steps; with weights=zero the offline rows of prompts with an online pair are left out
        # of the steps (their loss weight is 0), so Online DPO costs what its online pairs cost.
        self.meta_in_use = m.sampling == "meta" or m.weights == "meta"
        self.pos = Position()
        self.round = RoundState(run.pairs)
        self._rounds: list[list[int]] | None = None  # the current epoch's rounds (pair indices)
        self._order: list[RoundItem] | None = None  # the current round's items in step order
        self._step_started: float | None = None
        if m.reference == "per_round" and not hasattr(run.reference, "copy_from"):
            run.guard.moving_reference = run.reference  # saved with every checkpoint (LoRA's: with the policy)

    # ------------------------------------------------------------------ protocol
    def stateful(self) -> dict:
        return {"position": ("trainer", self.pos), "meta_learner": ("rank", self.learner),
                "round": ("shared", self.round)}

    def callbacks(self) -> list[object]:
        m, ctx = self.run.cfg.metaapo, self.run.ctx
        return [MetaUpdateCallback(self.learner, every=m.t_meta, frozen=not (m.meta_update and self.meta_in_use),
                                   after_step=lambda m: O.sync_meta_learner(self.learner, ctx, m))]

    def begin(self, st: TrainState, resumed: bool) -> None:
        from metaapo_nemo.checkpoint_io import truncate_jsonl

        items, run = self.round.items, self.run
        if items is not None and any(it.online is not None and it.online.ref_chosen is None for it in items):
            # a round checkpointed by a version that ran the reference per step (every rank)
            self.round.items = O.with_online_reference(run.reference, items, run.ctx, run.plan.micro_batch,
                                                       run.pad_id, run.layout)
        path = run.run_dir / "rounds.jsonl"
        if not run.ctx.is_main:
            return
        if not resumed:  # a fresh run in an existing run dir starts a fresh record
            path.unlink(missing_ok=True)
        else:  # rounds finished after this checkpoint by the interrupted run are redone
            truncate_jsonl(path, lambda rec: rec["round"] < self.pos.round_idx)

    def next_step(self, st: TrainState) -> StepWork | None:
        G = self.plan.global_batch
        self._count_train_time()
        while True:
            if self.round.items is None and not self._start_next_round(st):
                return None
            order = self._step_order()
            if self.pos.next_start + G <= len(order) - len(order) % G:
                break
            self._end_round(st)
        return self._step(order)

    def end(self, st: TrainState) -> None:
        self._count_train_time()
        if self.round.items is not None:  # stopped by train.max_steps inside a round
            self._end_round(st)

    def close(self) -> None:
        if self.rollout is not None:
            self.rollout.shutdown()

    # ------------------------------------------------------------------ rounds
    def _start_next_round(self, st: TrainState) -> bool:
        """Advances to the next round (False when every epoch is done) and prepares it."""
        cfg, pos = self.run.cfg, self.pos
        while True:
            if pos.epoch >= cfg.train.epochs:
                return False
            if self._rounds is None:
                self._rounds = O.round_slices(len(self.run.pairs), cfg.metaapo.round_size,
                                              self.plan.global_batch, cfg.run.seed, pos.epoch,
                                              cfg.data.shuffle)
            if pos.round_in_epoch < len(self._rounds):
                break
            pos.epoch, pos.round_in_epoch, self._rounds = pos.epoch + 1, 0, None
        r = pos.round_in_epoch
        before = (copy.deepcopy(pos.state_dict()), rng_state())
        pos.round_in_epoch, pos.next_start = r + 1, 0
        try:
            items, pos.round_record = self._prepare_round([self.run.pairs[i] for i in self._rounds[r]], st)
        except Preempted:  # abandoned at a check point: back to the last step boundary's state
            pos.load_state_dict(before[0])
            set_rng_state(before[1])
            raise
        self.round.items, self._order = items, None
        return True

    def _prepare_round(self, round_pairs: list, st: TrainState):
        """Margins with the current policy and reference -> w -> selection -> online pairs."""
        run, pos = self.run, self.pos
        cfg, ctx, m = run.cfg, run.ctx, run.cfg.metaapo
        from metaapo_nemo.rollout.pairs import AnnotationCounters

        t_round = time.perf_counter()
        keys = [p.index for p in round_pairs]
        if self.meta_in_use:
            mbs = rank_microbatches(round_pairs, StepPlan(len(round_pairs), cfg.train.micro_batch_size,
                                                          ctx.dims.dp), ctx.dp_rank, run.pad_id, ctx.device,
                                    run.layout)
            margins = {}
            for part in O.chunk_microbatches(mbs, len(round_pairs), m.prompts_per_chunk, ctx):
                margins |= offline_margins(run.policy, run.reference, run.loss, part, ctx, ref_cache=run.ref_cache)
                run.guard.preemption.check(ctx, "margins")
            w = self.learner.weights(torch.tensor([margins[k] for k in keys], dtype=torch.float32))
        else:  # the weights the steps use (h_phi is read nowhere); offline references come per step
            w = self._weigher()(torch.zeros(len(keys), dtype=torch.float32))
        selected = select_for_sampling(w, keys, cfg.run.seed, pos.round_idx, m.sampling)
        chosen = [p for p, s in zip(round_pairs, selected.tolist()) if s]
        report = O.online_pairs(chosen, self.rollout, self.reward, run.policy, self.sampling, cfg,
                                pos.round_idx, st.step, ctx,
                                check=lambda where: run.guard.preemption.check(ctx, where))
        totals = AnnotationCounters(**pos.counters)
        totals.add(report.counters)
        pos.counters = totals.as_dict()
        items = [RoundItem(p, report.pairs.get(p.index)) for p in round_pairs]
        t_ref = time.perf_counter()
        items = O.with_online_reference(run.reference, items, ctx, cfg.train.micro_batch_size, run.pad_id,
                                        run.layout)
        t_ref = time.perf_counter() - t_ref
        if m.unselected == "drop":
            items = [it for it in items if it.online is not None]
        pos.seen += len(round_pairs)
        pos.annotated += len(chosen)
        rm = {"round": pos.round_idx, "epoch": pos.epoch, "prompts": len(round_pairs),
              "sampled": len(chosen), "sample_ratio": len(chosen) / len(round_pairs),
              "selected_sha1": _digest(p.index for p in chosen),
              "online_pairs": len(report.pairs), "trained_prompts": len(items),
              "ties": report.counters.ties_all_equal + report.counters.ties_same_text,
              "too_few_candidates": report.counters.too_few_candidates,
              "annotation_ratio": pos.annotated / pos.seen, "samples_scored_total": totals.samples_scored,
              "samples_generated_total": totals.samples_generated, "refill_prompts": report.counters.refill_prompts,
              "rm_chosen_mean": report.rm_chosen_mean, "rm_rejected_mean": report.rm_rejected_mean,
              "refit_s": report.refit_s, "refit_mb": report.refit_bytes / 2**20, "generate_s": report.generate_s, "score_s": report.score_s,
              "reference_s": t_ref,
              "gen_tokens_per_s": report.generated_tokens / report.generate_s if report.generate_s else 0.0,
              "prepare_s": time.perf_counter() - t_round, "w_mean": float(w.mean())}
        rm |= {f"w_q{int(q * 100)}": float(torch.quantile(w.double(), q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
        return items, rm

    def _step_order(self) -> list[RoundItem]:
        if self._order is None:
            items, cfg = self.round.items, self.run.cfg
            order = (epoch_order(len(items), cfg.run.seed + 1, self.pos.round_idx) if cfg.data.shuffle
                     else range(len(items)))
            self._order = [items[i] for i in order]
        return self._order

    def _step(self, order: list[RoundItem]) -> StepWork:
        run, plan, pos = self.run, self.plan, self.pos
        ctx, G = run.ctx, plan.global_batch
        t0 = time.perf_counter()
        batch = order[pos.next_start:pos.next_start + G]
        pos.next_start += G  # consumed, whether the step applies or is skipped
        mine = batch[ctx.dp_rank * plan.per_rank:(ctx.dp_rank + 1) * plan.per_rank]
        if run.cfg.metaapo.weights == "zero":  # the offline term weighs 0 where an online pair exists
            mine = [it if it.online is None else dataclasses.replace(it, train_offline=False) for it in mine]
        mbs = round_microbatches(mine, plan.micro_batch, run.pad_id, ctx.device, run.layout)
        if run.reference is not None:
            missing = run.ref_cache.missing([it.pair for it in mine if it.train_offline])
            if missing:  # no margin pass ran (h_phi unused), or a resume into another layout
                run.ref_cache.fill(run.reference, to_microbatches(missing, plan.micro_batch, run.pad_id,
                                                                  ctx.device, run.layout))
        if run.reference is not None:  # no reference pass: the margin pass and the round's pass cached it
            O.attach_round_reference(run.ref_cache, mine, mbs, ctx.is_last_stage)
        mark = self.learner.buffer.mark()
        loss_fn = metaapo_loss_fn(run.loss, self._weigher(), G, run.cfg.metaapo.unselected,
                                  record=self.learner.record if ctx.is_last_stage and self.meta_in_use else None)

        self._step_started = t0
        return StepWork(mbs, loss_fn, lambda outs: finalize_round_stats(reduce_stats(sum_round_stats(outs), ctx), G),
                        units=G, info={"round": pos.round_idx},
                        on_skip=lambda _: self.learner.buffer.rollback(mark), started=t0)

    def _count_train_time(self) -> None:
        """Adds the last step's whole wall time (step, callbacks, checkpoint) to the round's train_s."""
        if self._step_started is not None:
            rec = self.pos.round_record
            rec["train_s"] = rec.get("train_s", 0.0) + time.perf_counter() - self._step_started
            self._step_started = None

    def _weigher(self):
        mode = self.run.cfg.metaapo.weights
        if mode == "meta":
            return self.learner.weights
        value = 0.0 if mode == "zero" else 1.0
        return lambda m: torch.full_like(m, value)

    def _end_round(self, st: TrainState) -> None:
        run, pos = self.run, self.pos
        if run.cfg.metaapo.reference == "per_round" and run.reference is not None:
            O.copy_policy_into_reference(run.policy, run.reference)  # the release's schedule
            run.ref_cache.invalidate()
        rm = pos.round_record | {"step": st.step}
        rm["train_s"] = rm.get("train_s", 0.0)
        rm["round_s"] = rm["prepare_s"] + rm["train_s"]
        st.metrics = {f"round/{k}": v for k, v in rm.items() if isinstance(v, (int, float))}
        if run.ctx.is_main:
            with open(run.run_dir / "rounds.jsonl", "a") as f:
                f.write(json.dumps(rm) + "\n")
        run.callbacks.fire("on_round_end", st)  # the terminal's round line is a callback's (run.py)
        self.round.items, self._order = None, None
        pos.round_idx += 1
