"""The ONE training loop of every method.

    while steps remain:
        work = algorithm.next_step(state)          # micro-batches + loss of this rank
        zero grads -> megatron forward/backward -> non-finite check -> optimiser step
        -> metrics -> callbacks -> checkpoint / preemption
    (a preemption signal during `next_step`'s preparation, e.g. a MetaAPO round's rollout,
    abandons it at the next check point: `Preempted`, then the same checkpoint-and-exit)

What differs between methods (offline DPO family, MetaAPO and its baselines) lives behind
`trainer.algorithm.Algorithm`; the state a resume needs is registered once with the
`RunGuard` (`guard.register`), so nothing here is per method.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from metaapo_nemo import preempt
from metaapo_nemo.models.policy import MegatronLM
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.algorithm import Algorithm, StepWork
from metaapo_nemo.trainer.callbacks import CallbackList, TrainState
from metaapo_nemo.trainer.resilience import Preempted
from metaapo_nemo.trainer.resume import RunGuard


@dataclass
class Trainer:
    algorithm: Algorithm
    policy: MegatronLM
    ctx: ParallelContext
    guard: RunGuard  # checkpoints (with every registered state), resume, preemption, non-finite
    callbacks: CallbackList
    total_steps: int

    def fit(self) -> TrainState:
        """Trains until `total_steps`, the data's end, a preemption or a requested stop."""
        st = TrainState(total_steps=self.total_steps)
        resumed = self.guard.restore(st, self.policy)
        self.algorithm.begin(st, resumed)
        save = lambda: self.guard.save(st, self.policy)  # noqa: E731
        self.callbacks.fire("on_train_start", st)
        preempt.enter("train")  # from here a signal is acted on at the loop's check points
        while st.step < st.total_steps and not st.stop:
            try:
                work = self.algorithm.next_step(st)
            except Preempted as exc:  # the preparation was abandoned; its state rolled back
                self.guard.preempted(st, save, f"; the round being prepared was abandoned at {exc.where}")
                break
            if work is None:
                break
            self.train_step(st, work, save)
        if not st.stop:  # a preempted run's checkpoint holds the unfinished round / epoch
            self.algorithm.end(st)
        self.guard.at_end(st, save)
        if st.exit_code == 0 and self.guard.preemption.requested(self.ctx):  # during the last save
            st.exit_code = self.guard.cfg.checkpoint.requeue_exit_code  # the requeued job only exports
        self.callbacks.fire("on_train_end", st)
        preempt.enter("done")  # the state is on disk: a signal from here on exits at once
        return st

    def train_step(self, st: TrainState, work: StepWork, save) -> None:
        """One optimiser step: the step body every method shares."""
        policy, mbs = self.policy, work.microbatches
        preempt.reached("step")
        policy.zero_grad()
        outs = policy.run(mbs, work.loss_fn, forward_only=False)
        lr = policy.lr  # the rate this step applies
        metrics = work.metrics(outs)
        if policy.router_loss is not None:  # a mixture-of-experts policy
            metrics["router_loss"] = policy.router_loss
        verdict = self.guard.check_step(policy, metrics["loss"])
        if verdict == "stop":
            self.guard.stop(st, metrics["loss"], save)
        if verdict == "apply":
            ok, grad_norm = policy.step()
        else:  # skipped: no update, and whatever the step recorded is undone
            ok, grad_norm = False, float("nan")
            if work.on_skip is not None:
                work.on_skip(metrics)
        if ok and not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"grad_norm={grad_norm} at step {st.step + 1} ({work.info}) after the update was "
                "applied; nothing from this step was checkpointed. Lower optim.lr and resume")
        dt = time.perf_counter() - work.started
        tokens = sum(mb.extras["tokens"] for mb in mbs) * self.ctx.dims.dp
        st.step += 1
        st.metrics = metrics | {"grad_norm": grad_norm, "lr": lr, **work.info, "step_time": dt,
                                "pairs_per_s": work.units / dt, "tokens_per_s": tokens / dt,
                                "update_applied": ok, "skipped_steps": self.guard.nonfinite.skipped_total}
        self.callbacks.fire("on_step_end", st)
        self.guard.after_step(st, save)
