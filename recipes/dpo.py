"""Offline DPO-family preference training (DPO, IPO, SimPO, KTO) on Megatron-Core.

Trains a policy from an HF checkpoint on offline preference pairs (UltraFeedback-binarized
schema) against a frozen reference in the same parallel layout, and exports the result as
an HF checkpoint.

    CPU (tiny default):  python recipes/dpo.py                  # conf/tiny_cpu.yaml
                         python recipes/dpo.py --config conf/tiny_cpu_simpo.yaml optim.lr=1e-4
    One node:            torchrun --nproc-per-node 8 recipes/dpo.py --config conf/<recipe>.yaml
    SLURM:               sbatch slurm/<script>.sbatch   (scale-out issue)
    Inspect only:        python recipes/dpo.py --dry-run parallel.tp=2
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from metaapo_nemo.config.cli import read_model_dims, world_size_from_env
from metaapo_nemo.config.schema import Config, check_layout
from metaapo_nemo.losses import PreferenceLoss
from metaapo_nemo.models.policy import MegatronLM
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.batching import StepPlan, global_batches, rank_slice, to_microbatches
from metaapo_nemo.trainer.entry import run_recipe
from metaapo_nemo.trainer.callbacks import CallbackList, TrainState
from metaapo_nemo.trainer.metrics import MetricsLogger, reduce_stats
from metaapo_nemo.trainer.resume import RunGuard, build_run_guard
from metaapo_nemo.trainer.rows import RowLayout, layout_from_config
from metaapo_nemo.trainer.preference import (
    ReferenceCache,
    finalize_stats,
    kl_estimate_from,
    policy_loss_fn,
    reference_on_device,
    sum_stats,
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
    loss: PreferenceLoss
    plan: StepPlan
    layout: RowLayout
    ref_cache: ReferenceCache  # lives with the data: one reference pass per pair per version
    total_steps: int
    logger: MetricsLogger
    callbacks: CallbackList
    guard: RunGuard  # checkpoints, resume, preemption, non-finite steps


def setup(cfg: Config, pairs: list | None = None) -> Components:
    """Builds everything: process groups, model source, data, policy, reference, loss.

    Args:
        cfg: The validated config.
        pairs: Already tokenised pairs to train on instead of `data.path` (benchmarks,
            tests); None loads and validates the configured data.
    """
    from transformers import AutoTokenizer

    from metaapo_nemo.data.preference import DataSpec, PreferenceData, load_preference_data
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.parallel import state
    from metaapo_nemo.trainer import setup as S

    check_layout(cfg, world_size_from_env(), read_model_dims(cfg))
    p = cfg.parallel
    build = S.build_options(cfg)  # layer spec / FP8 / SP checked before anything starts
    ctx = state.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, backend=p.backend, seed=cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    model_dir = S.resolve_model_dir(cfg, ctx)
    arch = load_arch(model_dir)
    check_layout(cfg, ctx.dims.world_size, arch.to_dict() | {"num_layers": arch.num_layers})
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    d = cfg.data
    spec = DataSpec(S.data_source(d.path), d.split, d.max_length, d.max_prompt_length, d.on_bad_row, d.limit)
    if pairs is None:
        data = load_preference_data(spec, tokenizer)
    else:
        data = PreferenceData(list(pairs), {}, f"{len(pairs)} given pairs")
    steps = S.total_steps(len(data.pairs), cfg)
    run_dir = S.make_run_dir(cfg, ctx)  # only once the data is known to be good
    plan = StepPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, ctx.dims.dp)
    plan.validate()
    layout = layout_from_config(cfg, build.spec_choice(on_gpu=ctx.device.type == "cuda").impl)
    pad_id = tokenizer.pad_token_id
    policy = MegatronLM(arch, ctx, model_dir, build, S.optim_settings(cfg, steps), pad_id=pad_id)
    loss = S.loss_from_config(cfg)
    reference = MegatronLM(arch, ctx, model_dir, build, pad_id=pad_id) if loss.needs_reference else None
    if reference is not None and cfg.reference.offload_to_cpu:
        reference.offload("cpu")  # lives on the CPU between uses (reference_on_device)
    if ctx.is_main:
        skipped = ", ".join(f"{k}={v}" for k, v in data.skipped.items()) or "none"
        print(f"data: {len(data.pairs)} pairs from {data.source} (skipped: {skipped}); "
              f"{steps} steps of {plan.global_batch} pairs = {plan.grad_accum} micro-batches "
              f"of {plan.micro_batch} x dp {ctx.dims.dp}", flush=True)
    guard = build_run_guard(cfg, ctx, run_dir)
    logger = MetricsLogger(run_dir, steps, enabled=ctx.is_main, progress=cfg.train.progress_bar,
                           resume_step=guard.resume_step)
    return Components(cfg, ctx, model_dir, run_dir, tokenizer, data.pairs, policy, reference,
                      loss, plan, layout, ReferenceCache(), steps, logger,
                      CallbackList([logger_callback(logger)]), guard)


def logger_callback(logger: MetricsLogger):
    class _Log:
        def on_step_end(self, state: TrainState) -> None:
            logger.log(state.step, state.metrics)

        def on_train_end(self, state: TrainState) -> None:
            logger.close()

    return _Log()


def fill_reference(c: Components, pairs: list) -> None:
    """Reference log-probs of the given pairs that the cache does not hold yet."""
    missing = c.ref_cache.missing(pairs)
    if c.reference is None or not missing:
        return
    ctx = c.ctx
    with reference_on_device(c.reference, ctx.device, c.cfg.reference.offload_to_cpu):
        mbs = to_microbatches(missing, c.plan.micro_batch, c.tokenizer.pad_token_id, ctx.device, c.layout)
        c.ref_cache.fill(c.reference, mbs)


def save_checkpoint(c: Components, st: TrainState, next_batch: int) -> None:
    """Everything needed to continue exactly after step `st.step` (batch `next_batch` next)."""
    c.guard.save(st, c.policy, c.ref_cache, {"recipe": "dpo", "epoch": st.epoch, "next_batch": next_batch})


def resume(c: Components, st: TrainState) -> int:
    """Loads the checkpoint chosen in setup (if any); returns the next batch of `st.epoch`."""
    r = c.guard.restore(st, c.policy, c.ref_cache)
    if r is None:
        return 0
    st.epoch = int(r.trainer["epoch"])
    return int(r.trainer["next_batch"])


def train(c: Components) -> TrainState:
    """The training loop: reference log-probs -> policy step -> metrics -> callbacks -> checkpoint."""
    cfg, ctx = c.cfg, c.ctx
    pad_id = c.tokenizer.pad_token_id
    st = TrainState(total_steps=c.total_steps)
    start = next_batch = resume(c, st)
    save = lambda: save_checkpoint(c, st, next_batch)  # noqa: E731
    c.callbacks.fire("on_train_start", st)
    for epoch in range(st.epoch, cfg.train.epochs):
        if st.step >= c.total_steps or st.stop:
            break
        st.epoch = epoch
        batches = list(global_batches(c.pairs, c.plan.global_batch, cfg.run.seed, epoch, cfg.data.shuffle))
        if cfg.reference.precompute:  # the whole pass up front (a no-op once cached)
            fill_reference(c, [p for b in batches for p in rank_slice(b, c.plan, ctx.dp_rank)])
        for next_batch, batch in enumerate(batches, start=1):
            if next_batch <= start:
                continue  # done before the checkpoint this run resumed from
            t0 = time.perf_counter()
            mine = rank_slice(batch, c.plan, ctx.dp_rank)
            fill_reference(c, mine)  # per step: only pairs never seen by this reference
            mbs = to_microbatches(mine, c.plan.micro_batch, pad_id, ctx.device, c.layout)
            if c.reference is not None:
                c.ref_cache.attach(mbs, ctx.is_last_stage)
            loss_fn = policy_loss_fn(c.loss, c.plan.global_batch, kl_estimate_from(st.metrics))
            c.policy.zero_grad()
            outs = c.policy.run(mbs, loss_fn, forward_only=False)
            lr = c.policy.lr  # the rate this step applies
            metrics = finalize_stats(reduce_stats(sum_stats(outs), ctx))
            verdict = c.guard.check_step(c.policy, metrics["loss"])
            if verdict == "stop":
                c.guard.stop(st, metrics["loss"], save)
            if verdict == "apply":
                ok, grad_norm = c.policy.step()
            else:  # skipped: no update; the KTO reference point stays the last good step's
                ok, grad_norm = False, float("nan")
                metrics["logratio"] = st.metrics.get("logratio", 0.0)
            if not math.isfinite(grad_norm) and ok:
                raise FloatingPointError(
                    f"grad_norm={grad_norm} at step {st.step + 1} after the update was applied; "
                    "nothing from this step was checkpointed. Lower optim.lr and resume")
            dt = time.perf_counter() - t0
            tokens = sum(mb.extras["tokens"] for mb in mbs) * ctx.dims.dp
            metrics |= {"grad_norm": grad_norm, "lr": lr, "step_time": dt,
                        "pairs_per_s": c.plan.global_batch / dt, "tokens_per_s": tokens / dt,
                        "epoch": epoch, "update_applied": ok,
                        "skipped_steps": c.guard.nonfinite.skipped_total}
            st.step += 1
            st.metrics = metrics
            c.callbacks.fire("on_step_end", st)
            c.guard.after_step(st, save)
            if st.step >= c.total_steps or st.stop:
                break
        start = 0
        if st.step >= c.total_steps or st.stop:
            break
    c.guard.at_end(st, save)
    c.callbacks.fire("on_train_end", st)
    return st


def finish(c: Components, st: TrainState) -> None:
    """Exports the final policy as an HF checkpoint and prints where everything is."""
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.parallel import state

    out = None
    if c.cfg.train.save_final_hf and st.exit_code == 0:  # preempted: the checkpoint is enough
        out = export_hf(c.policy.modules(), c.policy.arch, c.ctx, c.model_dir, c.run_dir / "hf_final")
    if c.ctx.is_main:
        last = st.metrics
        print(f"done: {st.step} steps; final loss {last.get('loss', float('nan')):.4f}, "
              f"reward accuracy {last.get('reward_accuracy', float('nan')):.2f}")
        print(f"run directory: {c.run_dir}")
        print(f"  config:  {c.run_dir / 'config.yaml'}")
        print(f"  metrics: {c.logger.path}")
        if out is not None:
            print(f"  policy (HF checkpoint): {out}")
    from metaapo_nemo.tasks.ifeval_eval import evaluate_run
    evaluate_run(c.cfg, c.ctx, c.policy, c.model_dir, c.run_dir)  # no-op unless `eval` is set
    state.destroy()


def main(argv: list[str] | None = None) -> int:
    return run_recipe(__doc__, setup, train, finish, argv)


if __name__ == "__main__":
    sys.exit(main())
