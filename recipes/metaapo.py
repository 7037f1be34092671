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

import json
import math
import sys
import time
from dataclasses import dataclass
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
    logger = MetricsLogger(run_dir, steps, enabled=ctx.is_main, progress=cfg.train.progress_bar)
    meta_cb = MetaUpdateCallback(learner, every=m.t_meta, frozen=not m.meta_update,
                                 after_step=lambda: O.sync_meta_learner(learner, ctx))
    callbacks = CallbackList([meta_cb, _Log(logger), TensorBoardCallback(run_dir, ctx.is_main)])
    return Components(cfg, ctx, model_dir, run_dir, tokenizer, data.pairs, policy, reference, loss, learner,
                      rollout, reward, SamplingSettings.from_config(cfg.rollout), steps, logger, callbacks,
                      ReferenceCache())


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


def train(c: Components) -> TrainState:
    """Rounds: margins -> w -> select -> generate + annotate -> meta-weighted training."""
    cfg, ctx, m = c.cfg, c.ctx, c.cfg.metaapo
    G, micro, pad_id = cfg.train.global_batch_size, cfg.train.micro_batch_size, c.tokenizer.pad_token_id
    st = TrainState(total_steps=c.total_steps)
    seen = annotated = 0
    round_idx = 0
    c.callbacks.fire("on_train_start", st)
    from metaapo_nemo.rollout.pairs import AnnotationCounters
    from metaapo_nemo.trainer.batching import StepPlan, rank_microbatches

    plan = StepPlan(G, micro, ctx.dims.dp)
    total_counters = AnnotationCounters()
    for epoch in range(cfg.train.epochs):
        for idx in O.round_slices(len(c.pairs), m.round_size, G, cfg.run.seed, epoch, cfg.data.shuffle):
            round_pairs = [c.pairs[i] for i in idx]
            t_round = time.perf_counter()
            # 1. offline margins with the current policy and reference -> w -> selection
            mbs = rank_microbatches(round_pairs, StepPlan(len(round_pairs), micro, ctx.dims.dp), ctx.dp_rank,
                                    pad_id, ctx.device)
            margins = offline_margins(c.policy, c.reference, c.loss, mbs, ctx, ref_cache=c.ref_cache)
            keys = [p.index for p in round_pairs]
            w = c.learner.weights(torch.tensor([margins[k] for k in keys], dtype=torch.float32))
            selected = select_for_sampling(w, keys, cfg.run.seed, round_idx, m.sampling)
            chosen = [p for p, s in zip(round_pairs, selected.tolist()) if s]
            # 2. refit + K samples + reward model -> online pairs
            report = O.online_pairs(chosen, c.rollout, c.reward, c.policy, c.sampling, cfg, round_idx,
                                    st.step, ctx)
            total_counters.add(report.counters)
            items = [RoundItem(p, report.pairs.get(p.index)) for p in round_pairs]
            if m.unselected == "drop":
                items = [it for it in items if it.online is not None]
            seen += len(round_pairs)
            annotated += len(chosen)
            # 3. train over the round's items with meta-weighted losses
            st = _train_round(c, items, round_idx, st, plan)
            rm = {"round": round_idx, "epoch": epoch, "step": st.step, "prompts": len(round_pairs),
                  "sampled": len(chosen), "sample_ratio": len(chosen) / len(round_pairs),
                  "online_pairs": len(report.pairs), "trained_prompts": len(items),
                  "ties": report.counters.ties_all_equal + report.counters.ties_same_text,
                  "too_few_candidates": report.counters.too_few_candidates,
                  "annotation_ratio": annotated / seen, "samples_scored_total": total_counters.samples_scored,
                  "rm_chosen_mean": report.rm_chosen_mean, "rm_rejected_mean": report.rm_rejected_mean,
                  "refit_s": report.refit_s, "generate_s": report.generate_s, "score_s": report.score_s,
                  "gen_tokens_per_s": report.generated_tokens / report.generate_s if report.generate_s else 0.0,
                  "round_s": time.perf_counter() - t_round, "w_mean": float(w.mean())}
            rm |= {f"w_q{int(q * 100)}": float(torch.quantile(w.double(), q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)}
            _end_round(c, st, rm)
            round_idx += 1
            if st.step >= c.total_steps or st.stop:
                break
        if st.step >= c.total_steps or st.stop:
            break
    c.callbacks.fire("on_train_end", st)
    return st


def _train_round(c: Components, items: list[RoundItem], round_idx: int, st: TrainState, plan) -> TrainState:
    cfg, ctx = c.cfg, c.ctx
    G, pad_id = plan.global_batch, c.tokenizer.pad_token_id
    from metaapo_nemo.data.collate import epoch_order

    order = epoch_order(len(items), cfg.run.seed + 1, round_idx) if cfg.data.shuffle else range(len(items))
    items = [items[i] for i in order]
    for start in range(0, len(items) - len(items) % G, G):
        t0 = time.perf_counter()
        batch = items[start:start + G]
        mine = batch[ctx.dp_rank * plan.per_rank:(ctx.dp_rank + 1) * plan.per_rank]
        mbs = [collate_round(mine[i:i + plan.micro_batch], pad_id, ctx.device)
               for i in range(0, len(mine), plan.micro_batch)]
        O.attach_round_reference(c.reference, c.ref_cache, mbs, ctx.is_last_stage)  # online rows only
        loss_fn = metaapo_loss_fn(c.loss, _weigher(c), G, cfg.metaapo.unselected,
                                  record=c.learner.record if ctx.is_last_stage else None)
        c.policy.zero_grad()
        outs = c.policy.run(mbs, loss_fn, forward_only=False)
        lr = c.policy.lr
        ok, grad_norm = c.policy.step()
        metrics = finalize_round_stats(reduce_stats(sum_round_stats(outs), ctx), G)
        if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
            raise FloatingPointError(
                f"non-finite loss={metrics['loss']} / grad_norm={grad_norm} at step {st.step + 1} "
                f"(round {round_idx}); lower optim.lr or check the data")
        dt = time.perf_counter() - t0
        tokens = sum(mb.extras["tokens"] for mb in mbs) * ctx.dims.dp
        st.step += 1
        st.metrics = metrics | {"grad_norm": grad_norm, "lr": lr, "round": round_idx, "step_time": dt,
                                "pairs_per_s": G / dt, "tokens_per_s": tokens / dt, "update_applied": ok}
        c.callbacks.fire("on_step_end", st)
        if st.step >= c.total_steps or st.stop:
            break
    return st


def _end_round(c: Components, st: TrainState, rm: dict) -> None:
    if c.cfg.metaapo.reference == "per_round" and c.reference is not None:
        O.copy_policy_into_reference(c.policy, c.reference)  # the release's schedule
        c.ref_cache.invalidate()
    st.metrics = {f"round/{k}": v for k, v in rm.items() if isinstance(v, (int, float))}
    if c.ctx.is_main:
        with open(c.run_dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(rm) + "\n")
        print(f"round {rm['round']}: sampled {rm['sampled']}/{rm['prompts']} (w mean {rm['w_mean']:.3f}), "
              f"{rm['online_pairs']} online pairs, {rm['ties']} ties, annotation ratio "
              f"{rm['annotation_ratio']:.3f}", flush=True)
    c.callbacks.fire("on_round_end", st)


def finish(c: Components, st: TrainState) -> None:
    """Exports the policy, writes the summary, and prints where everything is."""
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.parallel import state
    from metaapo_nemo.trainer.summary import write_summary

    if c.rollout is not None:
        c.rollout.shutdown()
    out = None
    if c.cfg.train.save_final_hf:
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
