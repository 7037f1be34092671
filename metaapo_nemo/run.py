"""A training run of any method: build once -> `Trainer.fit` -> finish.

    run = build(cfg)          # process groups, model, data, policy, reference, algorithm, guard
    state = fit(run)          # the one loop (metaapo_nemo.trainer.loop)
    finish(run, state)        # HF export, summary, evaluation, teardown

`main(argv, method)` is what the recipes call: parse -> --dry-run report, or build -> fit ->
finish, with configuration / data errors as one message and exit status 2. The recipe's
method is the config's `method` (a config stating another is refused); its algorithm class
is looked up by name.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metaapo_nemo import console, preempt
from metaapo_nemo.config.schema import Config, ConfigError
from metaapo_nemo.evals import EVAL_CURVE, get_eval
from metaapo_nemo.losses import PreferenceLoss
from metaapo_nemo.models.policy import MegatronLM
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.batching import StepPlan
from metaapo_nemo.trainer.callbacks import CallbackList, TrainState
from metaapo_nemo.trainer.metrics import MetricsLogger
from metaapo_nemo.trainer.preference import AdapterReference, FrozenReference, ReferenceCache
from metaapo_nemo.trainer.resume import RunGuard
from metaapo_nemo.trainer.rows import RowLayout


def _algorithms() -> dict[str, tuple[Any, Any]]:
    """method name -> (algorithm class, total_steps(num_pairs, cfg))."""
    from metaapo_nemo.algorithms import dpo, metaapo

    return {"dpo": (dpo.OfflinePreference, dpo.total_steps), "metaapo": (metaapo.MetaAPO, metaapo.total_steps)}


@dataclass
class Run:
    """Everything a run holds; the algorithm reads what it needs from here."""

    cfg: Config
    ctx: ParallelContext
    model_dir: Path
    run_dir: Path
    tokenizer: Any
    pairs: list
    policy: MegatronLM
    reference: FrozenReference | AdapterReference | None
    loss: PreferenceLoss
    plan: StepPlan
    layout: RowLayout
    ref_cache: ReferenceCache  # lives with the data: one reference pass per pair per version
    total_steps: int
    logger: MetricsLogger
    callbacks: CallbackList
    guard: RunGuard  # checkpoints (every registered state), resume, preemption, non-finite steps
    algorithm: Any = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def build(cfg: Config, method: str | None = None, pairs: list | None = None) -> Run:
    """Builds a run: process groups, model source, data, policy, reference, the algorithm.

    Args:
        cfg: The validated config.
        method: "dpo" (the offline family: the loss is `loss.name`) or "metaapo"; None:
            `cfg.method`. It must equal `cfg.method` (a config holds what its method uses).
        pairs: Already tokenised pairs to train on instead of `data.path` (benchmarks,
            tests); None loads and validates the configured data.
    """
    from transformers import AutoTokenizer

    from metaapo_nemo.config.cli import read_model_dims, world_size_from_env
    from metaapo_nemo.config.schema import check_layout
    from metaapo_nemo.data.preference import DataSpec, PreferenceData, load_preference_data, with_template_kwargs
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.parallel import state
    from metaapo_nemo.trainer import setup as S
    from metaapo_nemo.trainer.resume import build_run_guard
    from metaapo_nemo.trainer.rows import layout_from_config
    from metaapo_nemo.trainer.trackers import tracker_callbacks

    if cfg.eval is not None:
        fn = get_eval(cfg.eval.task)  # a bad name fails before anything starts, not after training
        if cfg.eval.every_steps is not None and "step" not in inspect.signature(fn).parameters:
            raise ConfigError(
                f"eval.every_steps={cfg.eval.every_steps} evaluates during training, but eval.task="
                f"{cfg.eval.task} takes no `step` argument (it evaluates only at the end): give the "
                "function a `step: int | None = None` parameter (tasks/gold_eval.py's evaluate_run "
                "has one) or remove eval.every_steps")
    from metaapo_nemo.config.schema import RECIPES

    method = cfg.method if method is None else method
    if method != cfg.method:
        raise ConfigError(f"the config runs method={cfg.method} ({RECIPES[cfg.method]}), not {method}: load it "
                          f"with load_config(..., method={method!r}) or build it as {cfg.method}")
    algorithm_cls, plan_steps = _algorithms()[method]
    check_layout(cfg, world_size_from_env(), read_model_dims(cfg))
    p = cfg.parallel
    build_opts = S.build_options(cfg)  # layer spec / FP8 / SP checked before anything starts
    ctx = state.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, backend=p.backend, seed=cfg.run.seed, ep=p.ep)
    torch.manual_seed(cfg.run.seed)
    model_dir = S.resolve_model_dir(cfg, ctx)
    arch = load_arch(model_dir)
    check_layout(cfg, ctx.dims.world_size, arch.to_dict() | {"num_layers": arch.num_layers})
    from metaapo_nemo.config.cli import startup_memory_check

    on_gpu = ctx.device.type == "cuda"
    warning = startup_memory_check(cfg, arch, ctx.dims.tp, ctx.dims.pp, ctx.dims.dp, on_gpu,
                                   torch.cuda.get_device_properties(ctx.device).total_memory / 2**30
                                   if on_gpu else None)
    if warning is not None and ctx.is_main:
        console.say("WARNING: " + warning)
    tokenizer = with_template_kwargs(AutoTokenizer.from_pretrained(str(model_dir)), cfg.data.chat_template_kwargs)
    d = cfg.data
    if pairs is None:
        spec = DataSpec(S.data_source(d.path), d.split, d.max_length, d.max_prompt_length, d.on_bad_row, d.limit)
        preempt.reached("data")
        data = load_preference_data(spec, tokenizer)
    else:
        data = PreferenceData(list(pairs), {}, f"{len(pairs)} given pairs")
    steps = plan_steps(len(data.pairs), cfg)
    run_dir = S.make_run_dir(cfg, ctx)  # only once the data is known to be good
    plan = StepPlan(cfg.train.global_batch_size, cfg.train.micro_batch_size, ctx.dims.dp)
    plan.validate()
    layout = layout_from_config(cfg, build_opts.spec_choice(on_gpu=ctx.device.type == "cuda").impl)
    pad_id = tokenizer.pad_token_id
    preempt.reached("model")  # HF -> Megatron conversion, optimiser
    policy = MegatronLM(arch, ctx, model_dir, build_opts, S.optim_settings(cfg, steps), pad_id=pad_id)
    loss = S.loss_from_config(cfg)
    reference = None
    if loss.needs_reference and build_opts.lora is not None:  # the policy with its adapters off
        moving = cfg.metaapo is not None and cfg.metaapo.reference == "per_round"
        reference = AdapterReference(policy, moving=moving)
    elif loss.needs_reference:
        preempt.reached("reference")
        reference = FrozenReference(MegatronLM(arch, ctx, model_dir, build_opts, pad_id=pad_id), ctx.device,
                                    cfg.reference.offload_to_cpu)
    guard = build_run_guard(cfg, ctx, run_dir)
    logger = MetricsLogger(run_dir, steps, enabled=ctx.is_main, progress=cfg.train.progress_bar,
                           resume_step=guard.resume_step, log_every=cfg.train.log_every)
    run = Run(cfg, ctx, model_dir, run_dir, tokenizer, data.pairs, policy, reference, loss, plan, layout,
              ReferenceCache(), steps, logger, CallbackList(), guard)
    run.algorithm = algorithm = algorithm_cls(run)
    # layout-bound: the values belong to this rank's DP shard / last stage
    guard.register("ref_cache", "rank", run.ref_cache, layout_bound=True)
    if build_opts.lora is not None:  # the adapters' base, refused on resume if it changed
        from metaapo_nemo.models.lora_peft import BaseFingerprint

        base = BaseFingerprint(model_dir)
        guard.register("lora_base", "trainer", base)
        if guard.resume_from is not None:  # before training: exit 2 with the message
            saved = json.loads((guard.resume_from / "trainer.json").read_text()).get("lora_base", {})
            try:
                base.load_state_dict(saved)
            except ValueError as exc:
                raise ConfigError(f"{guard.resume_from}: {exc}") from None
    for name, (where, obj) in algorithm.stateful().items():
        guard.register(name, where, obj)
    periodic = [] if cfg.eval is None or cfg.eval.every_steps is None else [_PeriodicEval(run, fn)]
    run.callbacks = CallbackList([*algorithm.callbacks(), _LogCallback(logger), *periodic,
                                  *tracker_callbacks(cfg, run_dir, ctx.is_main)])
    if ctx.is_main:
        console.say(setup_summary(run, data))
    return run


def setup_summary(run: Run, data) -> str:
    """The few lines a run starts with: what trains on what, in which layout, for how long."""
    cfg, plan, dims = run.cfg, run.plan, run.ctx.dims
    arch = run.policy.arch
    source = (f"tiny random {cfg.model.tiny.arch}" if cfg.model.tiny is not None else cfg.model.path)
    skipped = ", ".join(f"{k}={v}" for k, v in data.skipped.items()) or "none"
    lines = [
        f"{run.algorithm.name} run '{cfg.run.name}' -> {run.run_dir}",
        f"  model:  {source} ({arch.num_layers} layers, hidden {arch.hidden_size}, {run.policy.build.dtype})",
        f"  data:   {len(data.pairs)} pairs from {data.source} (skipped: {skipped})",
        f"  layout: {dims.world_size} process(es) = tp {dims.tp} x cp {dims.cp} x pp {dims.pp} x dp {dims.dp} "
        f"on {run.ctx.device.type}",
        f"  steps:  {run.total_steps} optimiser steps of {plan.global_batch} pairs = {plan.grad_accum} "
        f"micro-batches of {plan.micro_batch} x dp {dims.dp}; loss {cfg.loss.name}",
    ]
    if run.algorithm.name == "metaapo":
        m, r = cfg.metaapo, cfg.rollout
        lines.append(f"  rounds: {m.round_size} prompts, K={r.samples_per_prompt} samples each; "
                     f"sampling={m.sampling} weights={m.weights} unselected={m.unselected} "
                     f"reference={m.reference}")
    return "\n".join(lines)


class _PeriodicEval:
    """``eval.every_steps``: the run's evaluation at every N optimiser steps during training
    (the points of a gold-vs-steps curve, which the task appends to `evals.EVAL_CURVE`). The
    final evaluation at the end of training is the last point; a resumed run drops the points
    after its checkpoint, which it evaluates again."""

    def __init__(self, run: Run, fn: Callable[..., Any]):
        self.run, self.fn, self.every = run, fn, run.cfg.eval.every_steps

    def on_train_start(self, state: TrainState) -> None:
        from metaapo_nemo.checkpoint_io import truncate_jsonl

        if self.run.ctx.is_main:
            truncate_jsonl(self.run.run_dir / EVAL_CURVE, lambda rec: rec.get("step", 0) <= state.step)

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.every == 0 and state.step < state.total_steps:
            r = self.run
            self.fn(r.cfg, r.ctx, r.policy, r.model_dir, r.run_dir, step=state.step)


class _LogCallback:
    """Step records and the terminal's step / round lines (main rank only)."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_step_end(self, state: TrainState) -> None:
        self.logger.log(state.step, state.metrics)

    def on_round_end(self, state: TrainState) -> None:
        if self.logger.enabled:
            from metaapo_nemo.trainer.metrics import round_line

            console.say(round_line({k[len("round/"):]: v for k, v in state.metrics.items()
                                    if k.startswith("round/")}))

    def on_train_end(self, state: TrainState) -> None:
        self.logger.close()


def fit(run: Run) -> TrainState:
    """The one training loop over the run's algorithm."""
    from metaapo_nemo.trainer.loop import Trainer

    return Trainer(run.algorithm, run.policy, run.ctx, run.guard, run.callbacks, run.total_steps).fit()


def finish(run: Run, st: TrainState) -> None:
    """Exports the policy, writes the summary, evaluates (if configured), prints where things are."""
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.parallel import state
    from metaapo_nemo.trainer.summary import final_table, write_summary

    run.algorithm.close()
    out = None
    if run.cfg.train.save_final_hf and st.exit_code == 0:  # preempted: the checkpoint is enough
        preempt.reached("export")
        out = export_hf(run.policy.modules(), run.policy.arch, run.ctx, run.model_dir, run.run_dir / "hf_final")
        if run.policy.build.lora is not None:  # the merged model above, and the adapters for PEFT
            from metaapo_nemo.models.lora_peft import ADAPTER_DIR, export_peft

            export_peft(run.policy.modules(), run.policy.arch, run.ctx, run.policy.build.lora, str(run.model_dir),
                        run.run_dir / "hf_final" / ADAPTER_DIR)
    if run.ctx.is_main:
        summary = write_summary(run.run_dir, title=f"{run.algorithm.name} run {run.cfg.run.name}")
        console.say(final_table(run.run_dir, summary, out, st.exit_code))
    if run.cfg.eval is not None:  # the task the config names (checked by build)
        get_eval(run.cfg.eval.task)(run.cfg, run.ctx, run.policy, run.model_dir, run.run_dir)
    state.destroy()


def main(argv: list[str] | None = None, method: str = "metaapo", doc: str | None = None,
         extend: Callable[[Run], None] | None = None) -> int:
    """parse -> --dry-run report, or build -> fit -> finish; returns the exit status.

    `extend(run)` runs after build (e.g. benchmarks add a callback that snapshots the policy).
    """
    from metaapo_nemo.config.cli import parse, plan_report
    from metaapo_nemo.config.schema import ConfigError

    cfg, args = parse(argv, description=doc, method=method)
    preempt.reached("config")
    if args.dry_run:
        try:
            from metaapo_nemo.trainer.rows import describe_rows

            print(plan_report(cfg, args, rows_line=describe_rows(cfg)))
        except ConfigError as exc:  # the layout vs the world size or the model, the memory plan
            print(f"{Path(sys.argv[0]).name}: config error:\n{exc}", file=sys.stderr)
            return 2
        return 0
    console.setup(cfg.run.verbose)  # before vLLM is imported: library logs -> log.txt, warnings only
    try:
        return _build_fit_finish(cfg, method, extend)
    finally:
        console.close()


def _build_fit_finish(cfg: Config, method: str, extend: Callable[[Run], None] | None) -> int:
    from metaapo_nemo.checkpoint import CheckpointError
    from metaapo_nemo.config.schema import ConfigError
    from metaapo_nemo.data.preference import BadRowError, ChatTemplateError
    from metaapo_nemo.parallel import state
    from metaapo_nemo.trainer.resilience import NonFiniteError

    user_errors = (ConfigError, BadRowError, ChatTemplateError, FileNotFoundError, CheckpointError)
    try:
        run = build(cfg, method)
        console.attach_run_dir(run.run_dir, run.ctx.rank)
        if extend is not None:
            extend(run)
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        state.destroy()  # build may have initialised the process groups before the bad input
        return 2
    try:
        st = fit(run)
    except (NonFiniteError, CheckpointError) as exc:  # both messages say what was kept
        print(f"error: {exc}", file=sys.stderr)
        run.algorithm.close()
        run.logger.close()
        state.destroy()
        return NONFINITE_EXIT if isinstance(exc, NonFiniteError) else SAVE_FAILED_EXIT
    finish(run, st)
    return st.exit_code


NONFINITE_EXIT = 3  # stopped on a non-finite loss/gradient after saving the last good state
SAVE_FAILED_EXIT = 4  # a checkpoint could not be written (e.g. disk full); `latest` is the last good one
