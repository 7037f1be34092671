"""Preemption signals and non-finite guards for the training loops.

- `Preemption`: the loop's view of SIGTERM / SIGUSR1 (`metaapo_nemo.preempt` handles them from
  the first line of the process; an in-process run installs a recording handler here). The
  loop asks `requested()` at its check points (a MAX over all ranks, so a signal seen by any
  rank stops every rank at the same point): after each optimiser step, and between the parts
  of a MetaAPO round's preparation (`check`, which raises `Preempted`). It saves a checkpoint
  and exits with `checkpoint.requeue_exit_code` (85), which slurm/launch.sh turns into a requeue.
- `NonFiniteGuard`: a non-finite loss or gradient is caught BEFORE the optimiser applies
  it; per config the update is skipped (counted; `max_skips` in a row stop the run) or
  the run stops. The parameters never hold a non-finite update, so the state saved on
  stop is the last good one.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

from metaapo_nemo import preempt
from metaapo_nemo.parallel.state import ParallelContext

PREEMPT_SIGNALS = preempt.SIGNALS


class NonFiniteError(FloatingPointError):
    """Training stopped on a non-finite loss/gradient; the message says what was saved."""


class Preempted(Exception):
    """A preemption signal reached a check point inside a step's preparation (a MetaAPO round):
    the preparation is abandoned and the loop checkpoints the last step boundary."""

    def __init__(self, where: str):
        super().__init__(f"a preemption signal reached {where}")
        self.where = where


class Preemption:
    """The loop's preemption state over `metaapo_nemo.preempt` (see the module docstring)."""

    def __init__(self, signals=PREEMPT_SIGNALS):
        self._exit_now = None
        self._previous = {}
        if preempt.installed():  # an entry point: its handler records (train) or exits (start/done)
            return
        preempt.forget()  # in-process: a signal of an earlier run in this process is not ours
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass

    @property
    def signal_name(self) -> str | None:
        return preempt.signalled()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        name = preempt.record(signum)
        print(f"\n{name} received: finishing this optimiser step, then checkpoint and exit",
              file=sys.stderr, flush=True)

    def requested(self, ctx: ParallelContext) -> bool:
        """True on every rank if any rank got a signal (one tiny all-reduce per call)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=ctx.device)
        if dist.is_initialized() and ctx.dims.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def check(self, ctx: ParallelContext, where: str) -> None:
        """A check point inside a step's preparation (collective: every rank calls it at the
        same point): raises `Preempted` on every rank if any rank got a signal."""
        preempt.reached(where)
        if self.requested(ctx):
            raise Preempted(where)

    def exit_when_signalled(self, code: int) -> None:
        """After the preemption checkpoint: a further SIGTERM/SIGUSR1 ends the process at once
        with `code` (the state is on disk; what is left is the summary and teardown).

        Under `srun --kill-on-bad-exit` the first rank to exit 85 makes srun SIGTERM the
        others, which may still be writing the summary or tearing down; with the default
        action they died with 143, srun reported 143 and the batch script did not requeue
        (measured on the local cluster, tests/test_slurm_cluster.py). SLURM's time-limit
        SIGTERM is handled the same way. Python's finalisation resets every handler to the
        default action before it tears torch and vLLM down (seconds), so the process also
        leaves through `os._exit(code)` at the first atexit callback (registered last, runs
        first): nothing after it is needed, the checkpoint and the logs are written.
        `restore()` undoes both (a single process, e.g. an in-process test, carries on).
        """
        self._exit_now = lambda *_: (sys.stdout.flush(), sys.stderr.flush(), os._exit(code))
        if preempt.installed():
            preempt.set_exit_code(code)
            preempt.enter("done")  # its handler now exits at once
        else:
            for sig in self._previous:
                signal.signal(sig, self._exit_now)
        atexit.register(self._exit_now)

    def restore(self) -> None:
        if self._exit_now is not None:
            atexit.unregister(self._exit_now)
            self._exit_now = None
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


class NonFiniteGuard:
    """Decides per step: apply the update, skip it, or stop (see module docstring)."""

    def __init__(self, mode: str = "skip", max_skips: int = 3):
        if mode not in ("skip", "stop"):
            raise ValueError(f"checkpoint.on_nonfinite={mode!r}: use skip or stop")
        self.mode, self.max_skips = mode, max_skips
        self.skipped_total = 0
        self.skipped_in_row = 0

    def check(self, loss: float, grads_finite: bool) -> str:
        """'apply', 'skip' or 'stop' for a step with this reduced loss and gradient check."""
        if math.isfinite(loss) and grads_finite:
            self.skipped_in_row = 0
            return "apply"
        if self.mode == "stop" or self.skipped_in_row + 1 > self.max_skips:
            return "stop"
        self.skipped_in_row += 1
        self.skipped_total += 1
        return "skip"

    def state_dict(self) -> dict[str, int]:
        return {"skipped_total": self.skipped_total, "skipped_in_row": self.skipped_in_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_total = int(state["skipped_total"])
        self.skipped_in_row = int(state["skipped_in_row"])

    def stop_message(self, step: int, loss: float, saved: str) -> str:
        why = ("checkpoint.on_nonfinite=stop" if self.mode == "stop"
               else f"{self.max_skips} skipped steps in a row (checkpoint.max_skips)")
        return (f"non-finite loss or gradient at step {step} (loss={loss}); stopping after {why}. "
                f"{saved} Lower optim.lr, raise optim.clip_grad's effect, or check the data "
                "around this step; resume with the same command.")
