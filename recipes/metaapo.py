"""MetaAPO: meta-weighted adaptive preference optimisation (arXiv 2509.23371) on Megatron-Core.

Per round: offline margins with the current policy and reference -> meta weights w ->
seeded selection (u > w) -> weight push into vLLM + K samples for the selected prompts ->
reward model -> best/worst online pairs -> training with w * L_off + (1 - w) * L_on ->
a meta-learner step every T_meta optimiser steps. The paper's baselines and ablations are
settings of the same loop (see conf/tiny_cpu_*.yaml and MetaAPOConfig).

    CPU (tiny default):  python recipes/metaapo.py                 # conf/tiny_cpu.yaml
                         python recipes/metaapo.py --config conf/tiny_cpu_online_dpo.yaml
    One node:            torchrun --nproc-per-node 8 recipes/metaapo.py --config conf/llama31_8b_metaapo.yaml
    SLURM:               sbatch slurm/metaapo_llama31_8b.sbatch
    Inspect only:        python recipes/metaapo.py --dry-run
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metaapo_nemo.config.cli import read_model_dims, world_size_from_env
from metaapo_nemo.config.schema import Config, check_layout
from metaapo_nemo.meta import MetaLearner, MetaSettings, MetaUpdateCallback, select_for_sampling
from metaapo_nemo.models.policy import MegatronLM
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer import online as O
from metaapo_nemo.trainer.entry import run_recipe
from metaapo_nemo.trainer.callbacks import CallbackList, TrainState
from metaapo_nemo.trainer.metrics import MetricsLogger, reduce_stats
from metaapo_nemo.trainer.resume import RunGuard, build_run_guard
from metaapo_nemo.trainer.preference import ReferenceCache
from metaapo_nemo.trainer.rounds import (
    RoundItem,
    collate_round,
    finalize_round_stats,
    metaapo_loss_fn,
    offline_margins,
    sum_round_stats,
)



@dataclass
class Components:
    cfg: Config
    ctx: ParallelContext
    model_dir: Path
    run_dir: Path
    tokenizer: object
    pairs: list
    policy: MegatronLM
    reference: MegatronLM | None
    loss: object
    learner: MetaLearner
    rollout: object | None
    reward: object | None
    sampling: object
    total_steps: int
    logger: MetricsLogger
    callbacks: CallbackList
    guard: RunGuard  # checkpoints, resume, preemption, non-finite steps
    ref_cache: ReferenceCache  # offline pairs' reference log-probs, per reference version


def setup(cfg: Config) -> Components:
    """Builds everything: process groups, models, data, meta-learner, vLLM, reward model."""
    from transformers import AutoTokenizer

    from metaapo_nemo.data.preference import DataSpec, load_preference_data
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.parallel import state
    from metaapo_nemo.reward import build_reward_model
    from metaapo_nemo.rollout.generator import SamplingSettings
    from metaapo_nemo.trainer import setup as S
    from metaapo_nemo.trainer.summary import TensorBoardCallback

    check_layout(cfg, world_size_from_env(), read_model_dims(cfg))
    build = S.build_options(cfg)
    p, m = cfg.parallel, cfg.metaapo
    ctx = state.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, backend=p.backend, seed=cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model_dir = S.resolve_model_dir(cfg, ctx)
    arch = load_arch(model_dir)
    check_layout(cfg, ctx.dims.world_size, arch.to_dict() | {"num_layers": arch.num_layers})
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    d = cfg.data
    data = load_preference_data(
        DataSpec(S.data_source(d.path), d.split, d.max_length, d.max_prompt_length, d.on_bad_row, d.limit),
        tokenizer)
    steps = S.metaapo_total_steps(len(data.pairs), cfg)
    run_dir = S.make_run_dir(cfg, ctx)
    pad_id = tokenizer.pad_token_id
    policy = MegatronLM(arch, ctx, model_dir, build, S.optim_settings(cfg, steps), pad_id=pad_id)
    loss = S.loss_from_config(cfg)
    reference = MegatronLM(arch, ctx, model_dir, build, pad_id=pad_id) if loss.needs_reference else None
    learner = MetaLearner(
        MetaSettings(hidden=m.meta_hidden, init=m.meta_init, lr=m.meta_lr, weight_decay=m.meta_weight_decay,
                     clip_grad=m.meta_clip_grad, beta_in=m.beta_in, seed=cfg.run.seed),
        dp_group=ctx.dp_group_gloo)
    samples_needed = m.sampling != "none"
    rollout = reward = None
    if samples_needed:
        from metaapo_nemo.rollout.group import build_rollout_group

        rollout = build_rollout_group(cfg, str(model_dir), ctx, initial_step=0)
        reward = build_reward_model(cfg.reward, cache_dir=str(S.resolve_repo_path(cfg.run.cache_dir)))
    if ctx.is_main:
        print(f"data: {len(data.pairs)} prompts with offline pairs from {data.source}; "
              f"{steps} optimiser steps; sampling={m.sampling} weights={m.weights} "
              f"unselected={m.unselected} reference={m.reference}", flush=True)
    guard = build_run_guard(cfg, ctx, run_dir)
    logger = MetricsLogger(run_dir, steps, enabled=ctx.is_main, progress=cfg.train.progress_bar,
                           resume_step=guard.resume_step)
    meta_cb = MetaUpdateCallback(learner, every=m.t_meta, frozen=not m.meta_update,
                                 after_step=lambda: O.sync_meta_learner(learner, ctx))
    callbacks = CallbackList([meta_cb, _Log(logger), TensorBoardCallback(run_dir, ctx.is_main)])
    return Components(cfg, ctx, model_dir, run_dir, tokenizer, data.pairs, policy, reference, loss, learner,
                      rollout, reward, SamplingSettings.from_config(cfg.rollout), steps, logger, callbacks,
                      guard, ReferenceCache())


class _Log:
    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_step_end(self, state: TrainState) -> None:
        self.logger.log(state.step, state.metrics)

    def on_train_end(self, state: TrainState) -> None:
        self.logger.close()


def _weigher(c: Components):
    mode = c.cfg.metaapo.weights
    if mode == "meta":
        return c.learner.weights
    value = 0.0 if mode == "zero" else 1.0
    return lambda m: torch.full_like(m, value)


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


def train(c: Components) -> TrainState:
    """Rounds: margins -> w -> select -> generate + annotate -> meta-weighted training."""
    cfg, m = c.cfg, c.cfg.metaapo
    from metaapo_nemo.rollout.pairs import AnnotationCounters
    from metaapo_nemo.trainer.batching import StepPlan

    st = TrainState(total_steps=c.total_steps)
    plan = StepPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, c.ctx.dims.dp)
    pos, items = _resume(c, st)  # items: the round a checkpoint stopped inside, else None
    totals = AnnotationCounters(**pos.counters)
    c.callbacks.fire("on_train_start", st)
    for epoch in range(pos.epoch, cfg.train.epochs):
        rounds = O.round_slices(len(c.pairs), m.round_size, plan.global_batch, cfg.run.seed, epoch,
                                cfg.data.shuffle)
        # a round restored mid-way is round_in_epoch - 1 of the saved epoch
        first = (pos.round_in_epoch - (items is not None)) if epoch == pos.epoch else 0
        for r in range(first, len(rounds)):
            if st.step >= c.total_steps or st.stop:
                break
            if items is None:  # a new round: margins, selection, online pairs
                pos.epoch, pos.round_in_epoch, pos.next_start = epoch, r + 1, 0
                items, pos.round_record = _start_round(c, [c.pairs[i] for i in rounds[r]], pos, totals, st)
            st = _train_round(c, items, pos, st, plan)
            if st.stop:  # preempted: the checkpoint holds the round; nothing else happens
                break
            _end_round(c, st, pos)
            items = None
            pos.round_idx += 1
        if st.step >= c.total_steps or st.stop:
            break
    c.guard.at_end(st, lambda: _save(c, st, pos, items))
    c.callbacks.fire("on_train_end", st)
    return st


def _start_round(c: Components, round_pairs: list, pos: Position, totals, st: TrainState):
    """Margins with the current policy and reference -> w -> selection -> online pairs."""
    cfg, ctx, m = c.cfg, c.ctx, c.cfg.metaapo
    from metaapo_nemo.trainer.batching import StepPlan, rank_microbatches

    t_round = time.perf_counter()
    micro, pad_id = cfg.train.micro_batch_size, c.tokenizer.pad_token_id
    mbs = rank_microbatches(round_pairs, StepPlan(len(round_pairs), micro, ctx.dims.dp), ctx.dp_rank,
                            pad_id, ctx.device)
    margins = offline_margins(c.policy, c.reference, c.loss, mbs, ctx, ref_cache=c.ref_cache)
    keys = [p.index for p in round_pairs]
    w = c.learner.weights(torch.tensor([margins[k] for k in keys], dtype=torch.float32))
    selected = select_for_sampling(w, keys, cfg.run.seed, pos.round_idx, m.sampling)
    chosen = [p for p, s in zip(round_pairs, selected.tolist()) if s]
    report = O.online_pairs(chosen, c.rollout, c.reward, c.policy, c.sampling, cfg, pos.round_idx, st.step, ctx)
    totals.add(report.counters)
    pos.counters = totals.as_dict()
    items = [RoundItem(p, report.pairs.get(p.index)) for p in round_pairs]
    if m.unselected == "drop":
        items = [it for it in items if it.online is not None]
    pos.seen += len(round_pairs)
    pos.annotated += len(chosen)
    rm = {"round": pos.round_idx, "epoch": pos.epoch, "prompts": len(round_pairs),
          "sampled": len(chosen), "sample_ratio": len(chosen) / len(round_pairs),
          "online_pairs": len(report.pairs), "trained_prompts": len(items),
          "ties": report.counters.ties_all_equal + report.counters.ties_same_text,
          "too_few_candidates": report.counters.too_few_candidates,
          "annotation_ratio": pos.annotated / pos.seen, "samples_scored_total": totals.samples_scored,
          "rm_chosen_mean": report.rm_chosen_mean, "rm_rejected_mean": report.rm_rejected_mean,
          "refit_s": report.refit_s, "generate_s": report.generate_s, "score_s": report.score_s,
          "gen_tokens_per_s": report.generated_tokens / report.generate_s if report.generate_s else 0.0,
          "prepare_s": time.perf_counter() - t_round, "w_mean": float(w.mean())}
    rm |= {f"w_q{int(q * 100)}": float(torch.quantile(w.double(), q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
    return items, rm


def _train_round(c: Components, items: list[RoundItem], pos: Position, st: TrainState, plan) -> TrainState:
    cfg, ctx = c.cfg, c.ctx
    G, pad_id = plan.global_batch, c.tokenizer.pad_token_id
    from metaapo_nemo.data.collate import epoch_order

    t_train = time.perf_counter()
    order = epoch_order(len(items), cfg.run.seed + 1, pos.round_idx) if cfg.data.shuffle else range(len(items))
    ordered = [items[i] for i in order]
    save = lambda: _save(c, st, pos, items)  # noqa: E731  (items in round order: resume reshuffles)
    for start in range(pos.next_start, len(ordered) - len(ordered) % G, G):
        if st.step >= c.total_steps:
            break
        t0 = time.perf_counter()
        batch = ordered[start:start + G]
        mine = batch[ctx.dp_rank * plan.per_rank:(ctx.dp_rank + 1) * plan.per_rank]
        mbs = [collate_round(mine[i:i + plan.micro_batch], pad_id, ctx.device)
               for i in range(0, len(mine), plan.micro_batch)]
        O.attach_round_reference(c.reference, c.ref_cache, mbs, ctx.is_last_stage)  # online rows only
        mark = c.learner.buffer.mark()
        loss_fn = metaapo_loss_fn(c.loss, _weigher(c), G, cfg.metaapo.unselected,
                                  record=c.learner.record if ctx.is_last_stage else None)
        c.policy.zero_grad()
        outs = c.policy.run(mbs, loss_fn, forward_only=False)
        lr = c.policy.lr
        metrics = finalize_round_stats(reduce_stats(sum_round_stats(outs), ctx), G)
        verdict = c.guard.check_step(c.policy, metrics["loss"])
        if verdict == "stop":
            c.guard.stop(st, metrics["loss"], save)
        if verdict == "apply":
            ok, grad_norm = c.policy.step()
        else:  # skipped: no update, and the step's meta records are dropped
            ok, grad_norm = False, float("nan")
            c.learner.buffer.rollback(mark)
        if ok and not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"grad_norm={grad_norm} at step {st.step + 1} (round {pos.round_idx}) after the update "
                "was applied; nothing from this step was checkpointed. Lower optim.lr and resume")
        dt = time.perf_counter() - t0
        tokens = sum(mb.extras["tokens"] for mb in mbs) * ctx.dims.dp
        st.step += 1
        pos.next_start = start + G
        st.metrics = metrics | {"grad_norm": grad_norm, "lr": lr, "round": pos.round_idx, "step_time": dt,
                                "pairs_per_s": G / dt, "tokens_per_s": tokens / dt, "update_applied": ok,
                                "skipped_steps": c.guard.nonfinite.skipped_total}
        c.callbacks.fire("on_step_end", st)
        c.guard.after_step(st, save)
        if st.stop:
            break
    pos.round_record["train_s"] = pos.round_record.get("train_s", 0.0) + time.perf_counter() - t_train
    return st


def _end_round(c: Components, st: TrainState, pos: Position) -> None:
    if c.cfg.metaapo.reference == "per_round" and c.reference is not None:
        O.copy_policy_into_reference(c.policy, c.reference)  # the release's schedule
        c.ref_cache.invalidate()
    rm = pos.round_record | {"step": st.step}
    rm["round_s"] = rm["prepare_s"] + rm["train_s"]
    st.metrics = {f"round/{k}": v for k, v in rm.items() if isinstance(v, (int, float))}
    if c.ctx.is_main:
        with open(c.run_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(rm) + "\n")
        print(f"round {rm['round']}: sampled {rm['sampled']}/{rm['prompts']} (w mean {rm['w_mean']:.3f}), "
              f"{rm['online_pairs']} online pairs, {rm['ties']} ties, annotation ratio "
              f"{rm['annotation_ratio']:.3f}", flush=True)
    c.callbacks.fire("on_round_end", st)


# ----------------------------------------------------------------- checkpoint / resume


def _save(c: Components, st: TrainState, pos: Position, items: list[RoundItem] | None) -> None:
    """Models + position + the current round's items (so a resumed round needs no rollout)."""
    round_items = None if items is None else [(it.pair.index, it.online) for it in items]
    moving_ref = c.reference if c.cfg.metaapo.reference == "per_round" else None
    c.guard.save(st, c.policy, c.ref_cache, {"recipe": "metaapo", "position": dataclasses.asdict(pos)},
                 rank={"learner": c.learner.state_dict()}, shared={"round_items": round_items},
                 reference=moving_ref)


def _resume(c: Components, st: TrainState) -> tuple[Position, list[RoundItem] | None]:
    from metaapo_nemo.checkpoint import truncate_jsonl

    r = c.guard.restore(st, c.policy, c.ref_cache, c.reference)
    if r is None:
        if c.ctx.is_main:  # a fresh run in an existing run dir starts a fresh record
            (c.run_dir / "rounds.jsonl").unlink(missing_ok=True)
        return Position(), None
    pos = Position(**r.trainer["position"])
    c.learner.load_state_dict(r.rank["learner"])
    if c.ctx.is_main:  # rounds finished after this checkpoint by the interrupted run are redone
        truncate_jsonl(c.run_dir / "rounds.jsonl", lambda rec: rec["round"] < pos.round_idx)
    saved = r.shared["round_items"]
    if saved is None:
        return pos, None
    by_index = {p.index: p for p in c.pairs}
    items = [RoundItem(by_index[i], online) for i, online in saved]
    if r.rank.get("layout_changed") and c.reference is not None:  # per-rank cache: a new pass
        from metaapo_nemo.trainer.batching import StepPlan, rank_microbatches

        pairs = [it.pair for it in items]
        mbs = rank_microbatches(pairs, StepPlan(len(pairs), c.cfg.train.micro_batch_size, c.ctx.dims.dp),
                                c.ctx.dp_rank, c.tokenizer.pad_token_id, c.ctx.device)
        c.ref_cache.fill(c.reference, mbs)
    return pos, items


def finish(c: Components, st: TrainState) -> None:
    """Exports the policy, writes the summary, and prints where everything is."""
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.parallel import state
    from metaapo_nemo.trainer.summary import write_summary

    if c.rollout is not None:
        c.rollout.shutdown()
    out = None
    if c.cfg.train.save_final_hf and st.exit_code == 0:  # preempted: the checkpoint is enough
        out = export_hf(c.policy.modules(), c.policy.arch, c.ctx, c.model_dir, c.run_dir / "hf_final")
    if c.ctx.is_main:
        summary = write_summary(c.run_dir, title=f"MetaAPO run {c.cfg.run.name}")
        print(f"done: {st.step} steps; summary: {summary}")
        print(f"run directory: {c.run_dir}")
        print(f"  config:      {c.run_dir / 'config.yaml'}")
        print(f"  metrics:     {c.run_dir / 'metrics.jsonl'} (steps), {c.run_dir / 'rounds.jsonl'} (rounds)")
        print(f"  tensorboard: {c.run_dir / 'tensorboard'}")
        print(f"  plots:       {c.run_dir / 'plots'}")
        if out is not None:
            print(f"  policy (HF checkpoint): {out}")
    from metaapo_nemo.tasks.ifeval_eval import evaluate_run
    evaluate_run(c.cfg, c.ctx, c.policy, c.model_dir, c.run_dir)  # no-op unless `eval` is set
    state.destroy()


def main(argv: list[str] | None = None) -> int:
    return run_recipe(__doc__, setup, train, finish, argv)


if __name__ == "__main__":
    sys.exit(main())
