"""What the training loop needs to survive a week-long run: checkpoints, resume, signals,
non-finite guards, bundled as one `RunGuard` built with the run.

Stateful parts (data position, round, meta-learner, reference cache, ...) are registered
ONCE with `guard.register(name, where, obj)`; `guard.save` / `guard.restore` handle all of
them plus what every run has (metrics, scheduler, non-finite counters, RNG). The loop
(`trainer.loop.Trainer`) calls, per optimiser step:

    verdict = guard.check_step(policy, loss)     # before policy.step(): apply / skip / stop
    ...
    guard.after_step(st, save)                   # checkpoint if due or preempted
    guard.preempted(st, save, ...)               # a step's preparation was abandoned (Preempted)

and `guard.at_end(st, save)` once after the loop, with `save = lambda: guard.save(st, policy)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from metaapo_nemo import preempt
from metaapo_nemo.checkpoint import Checkpointer, step_of
from metaapo_nemo.checkpoint_io import rng_state, set_rng_state
from metaapo_nemo.config.schema import Config
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.callbacks import TrainState
from metaapo_nemo.trainer.resilience import NonFiniteError, NonFiniteGuard, Preemption

WHERE = ("trainer", "rank", "shared")
RESERVED = ("metrics", "scheduler", "nonfinite", "rng", "step", "format", "world_size", "layout")


@dataclass
class RunGuard:
    cfg: Config
    ctx: ParallelContext
    ckpt: Checkpointer
    preemption: Preemption
    nonfinite: NonFiniteGuard
    resume_from: Path | None  # the checkpoint this run continues from (verified), or None
    states: dict = field(default_factory=dict)  # name -> (where, object, layout_bound)
    moving_reference: object | None = None  # a reference that changes during the run (saved)

    @property
    def resume_step(self) -> int | None:
        return step_of(self.resume_from)

    def check_step(self, policy, loss: float) -> str:
        """'apply', 'skip' (the caller zeroes grads and moves on) or 'stop' (raise via `stop`)."""
        return self.nonfinite.check(loss, policy.grads_finite() if math.isfinite(loss) else False)

    def stop(self, st: TrainState, loss: float, save: Callable[[], None]) -> None:
        """Saves the last good state (the bad update was never applied) and raises."""
        if self.ckpt.last_saved_step != st.step:
            save()
        saved = f"The last good state (step {st.step}) is checkpoint {self.ckpt.root}/latest."
        raise NonFiniteError(self.nonfinite.stop_message(st.step + 1, loss, saved))

    def after_step(self, st: TrainState, save: Callable[[], None]) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and st.step % every == 0:
            save()
        if self.preemption.requested(self.ctx):  # also a signal that came during that save
            self.preempted(st, save)

    def preempted(self, st: TrainState, save: Callable[[], None], where: str = "") -> None:
        """Checkpoints the state of step `st.step` (unless `latest` holds it) and ends the run
        with the requeue status; after a step, or when a step's preparation was abandoned."""
        if st.step > 0 and self.ckpt.last_saved_step != st.step:  # step 0: the model's own weights
            save()
        st.stop = True
        st.exit_code = self.cfg.checkpoint.requeue_exit_code
        self.preemption.exit_when_signalled(st.exit_code)
        if self.ctx.is_main:
            print(f"preempted ({self.preemption.signal_name or 'signal on another rank'}{where}): "
                  f"checkpoint at step {st.step} saved in {self.ckpt.root}; exiting with "
                  f"{st.exit_code} so the job is requeued", flush=True)

    def at_end(self, st: TrainState, save: Callable[[], None]) -> None:
        if st.exit_code == 0 and self.cfg.checkpoint.save_at_end and self.ckpt.last_saved_step != st.step:
            save()
        # A preempted rank of a multi-process launch keeps "signal -> exit 85" until it exits
        # (srun terminates the slower ranks once the first one exits 85); a single process
        # (also the in-process tests) gets its previous handlers back.
        if st.exit_code == 0 or self.ctx.dims.world_size == 1:
            self.preemption.restore()

    def register(self, name: str, where: str, obj, layout_bound: bool = False) -> None:
        """Registers a stateful object (state_dict / load_state_dict) ONCE: every checkpoint
        saves it and a resume loads it. `where`: "trainer" (JSON), "rank" (one file per rank)
        or "shared" (one copy). `layout_bound` rank state (values that belong to this rank's
        DP shard / pipeline stage) is not loaded into another layout."""
        if where not in WHERE:
            raise ValueError(f"where={where!r}; use one of {WHERE}")
        if name in self.states or name in RESERVED:
            raise ValueError(f"state {name!r} is registered already (or reserved: {RESERVED})")
        self.states[name] = (where, obj, layout_bound)

    def save(self, st: TrainState, policy) -> None:
        """Checkpoints step `st.step`: every registered state plus what every run has (last
        metrics, scheduler, non-finite counters, RNG) and the moving reference, if any."""
        parts: dict[str, dict] = {w: {} for w in WHERE}
        for name, (where, obj, _) in self.states.items():
            parts[where][name] = obj.state_dict()
        trainer = parts["trainer"] | {"metrics": st.metrics, "scheduler": policy.scheduler.state_dict(),
                                      "nonfinite": self.nonfinite.state_dict()}
        rank = parts["rank"] | {"rng": rng_state()}
        self.ckpt.save(st.step, policy, trainer, rank, shared=parts["shared"], reference=self.moving_reference)

    def restore(self, st: TrainState, policy) -> bool:
        """Loads the checkpoint chosen at set-up (if any) into the models and every registered
        state; False for a fresh run."""
        if self.resume_from is None:
            return False
        r = self.ckpt.load(self.resume_from, policy, self.moving_reference)
        preempt.reached("resume")
        if self.ctx.is_main:
            print(f"resumed from {self.resume_from} (step {r.trainer['step']})", flush=True)
        t = r.trainer
        st.step, st.metrics = int(t["step"]), dict(t["metrics"])
        policy.scheduler.load_state_dict(t["scheduler"])
        self.nonfinite.load_state_dict(t["nonfinite"])
        set_rng_state(r.rank["rng"])
        changed = bool(r.rank.get("layout_changed"))
        sources = {"trainer": r.trainer, "rank": r.rank, "shared": r.shared}
        for name, (where, obj, layout_bound) in self.states.items():
            if layout_bound and changed:
                continue  # e.g. reference values of another DP shard: recomputed when needed
            obj.load_state_dict(sources[where][name])
        return True


def build_run_guard(cfg: Config, ctx: ParallelContext, run_dir: Path) -> RunGuard:
    from metaapo_nemo.config.loader import to_yaml

    c = cfg.checkpoint
    preempt.set_exit_code(c.requeue_exit_code)
    ckpt = Checkpointer(run_dir, ctx, keep_last=c.keep_last, verify=c.verify, config_yaml=to_yaml(cfg))
    resume_from = None if c.resume == "never" else ckpt.find(None if c.resume == "auto" else c.resume)
    return RunGuard(cfg, ctx, ckpt, Preemption(), NonFiniteGuard(c.on_nonfinite, c.max_skips), resume_from)
