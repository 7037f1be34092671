"""What every recipe's loop needs to survive a week-long run: checkpoints, resume, signals,
non-finite guards, bundled as one `RunGuard` built in `setup()`.

The loop calls, per optimiser step:

    verdict = guard.check_step(policy, loss)     # before policy.step(): apply / skip / stop
    ...
    guard.after_step(st, save)                   # checkpoint if due or preempted

and `guard.at_end(st, save)` once after the loop; `save` is the recipe's own function that
passes its own state (position, meta-learner, ...) to `guard.save`, which adds what every
recipe has; `guard.restore` loads both back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from metaapo_nemo.checkpoint import Checkpointer, Restored, rng_state, set_rng_state, step_of
from metaapo_nemo.config.schema import Config
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.callbacks import TrainState
from metaapo_nemo.trainer.resilience import NonFiniteError, NonFiniteGuard, Preemption


@dataclass
class RunGuard:
    cfg: Config
    ctx: ParallelContext
    ckpt: Checkpointer
    preemption: Preemption
    nonfinite: NonFiniteGuard
    resume_from: Path | None  # the checkpoint this run continues from (verified), or None

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
        preempted = self.preemption.requested(self.ctx)
        if preempted or (every and st.step % every == 0):
            save()
        if preempted:
            st.stop = True
            st.exit_code = self.cfg.checkpoint.requeue_exit_code
            if self.ctx.is_main:
                print(f"preempted ({self.preemption.signal_name or 'signal on another rank'}): "
                      f"checkpoint at step {st.step} saved in {self.ckpt.root}; exiting with "
                      f"{st.exit_code} so the job is requeued", flush=True)

    def at_end(self, st: TrainState, save: Callable[[], None]) -> None:
        if st.exit_code == 0 and self.cfg.checkpoint.save_at_end and self.ckpt.last_saved_step != st.step:
            save()
        self.preemption.restore()

    def save(self, st: TrainState, policy, ref_cache, trainer: dict, rank: dict | None = None,
             shared: dict | None = None, reference=None) -> None:
        """Checkpoints step `st.step`: the recipe's own `trainer`/`rank`/`shared` state plus what
        every recipe has (last metrics, scheduler, non-finite counters, RNG, reference cache)."""
        trainer = trainer | {"metrics": st.metrics, "scheduler": policy.scheduler.state_dict(),
                             "nonfinite": self.nonfinite.state_dict()}
        rank = (rank or {}) | {"rng": rng_state(), "ref_cache": ref_cache.state_dict()}
        self.ckpt.save(st.step, policy, trainer, rank, shared=shared, reference=reference)

    def restore(self, st: TrainState, policy, ref_cache, reference=None) -> Restored | None:
        """Loads the checkpoint chosen at set-up (if any) into the models and the common state;
        returns it for the recipe's own fields, or None for a fresh run."""
        if self.resume_from is None:
            return None
        r = self.ckpt.load(self.resume_from, policy, reference)
        if self.ctx.is_main:
            print(f"resumed from {self.resume_from} (step {r.trainer['step']})", flush=True)
        t = r.trainer
        st.step, st.metrics = int(t["step"]), dict(t["metrics"])
        policy.scheduler.load_state_dict(t["scheduler"])
        self.nonfinite.load_state_dict(t["nonfinite"])
        set_rng_state(r.rank["rng"])
        if not r.rank.get("layout_changed"):  # values are per DP shard / last stage
            ref_cache.load_state_dict(r.rank["ref_cache"])
        return r


def build_run_guard(cfg: Config, ctx: ParallelContext, run_dir: Path) -> RunGuard:
    from metaapo_nemo.config.loader import to_yaml

    c = cfg.checkpoint
    ckpt = Checkpointer(run_dir, ctx, keep_last=c.keep_last, verify=c.verify, config_yaml=to_yaml(cfg))
    resume_from = None if c.resume == "never" else ckpt.find(None if c.resume == "auto" else c.resume)
    return RunGuard(cfg, ctx, ckpt, Preemption(), NonFiniteGuard(c.on_nonfinite, c.max_skips), resume_from)
