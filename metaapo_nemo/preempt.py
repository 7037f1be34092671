"""Preemption signals from the first line of a training process to its last (stdlib only).

SLURM signals every process of a job step at any moment: ``--signal=USR1@N`` (whose time is
only accurate to ~60 s, and a requeued job starts its clock again), ``scancel --signal``,
preemption and the time limit (SIGTERM). The entry points (recipes/*.py, ``metaapo-nemo
train``) call `install()` before any heavy import, so SIGUSR1 and SIGTERM never kill a rank
with "User defined signal 1". What a signal does depends on where the run is (`enter`):

- ``start`` (imports, config, data, HF -> Megatron conversion, reference and reward model,
  engine build, the resume load): nothing was trained since the newest complete checkpoint,
  so the process exits at once with the requeue status (85 unless ``REQUEUE_EXIT`` or
  ``checkpoint.requeue_exit_code`` say otherwise); ``latest`` is untouched.
- ``train`` (the loop): the signal is recorded and the loop acts at its next check point:
  after an optimiser step (a checkpoint, then 85) or inside a MetaAPO round's preparation
  (margins, refit, generation chunks, scoring: the round is abandoned, the last step's state
  is checkpointed unless ``latest`` holds it already, then 85). A second signal while the
  preemption checkpoint is written is recorded and changes nothing (checkpoints are
  committed atomically anyway).
- ``done`` (after the preemption checkpoint; after the last checkpoint of a finished run:
  export, summary, evaluation): the state is on disk, so a signal exits at once with the
  requeue status (a requeued finished run only exports again).

Every rank that gets a signal writes a line to ``$METAAPO_PREEMPT_MARKER`` (slurm/launch.sh
sets it in the run directory): the launcher requeues on that marker as well as on exit 85,
so a rank killed while blocked in a collective cannot turn a preemption into a lost job.

In-process use (tests calling `run.main`, notebooks) never installs the exiting handler: the
trainer's `Preemption` installs a recording one, as it always did.

Test hook: ``METAAPO_SIGNAL_AT=<point>[:<signal>][,<point>[:<signal>]...]`` makes
`reached(<point>)` send this process that signal (default SIGUSR1), once per listed point, so
tests can place signals in any phase without sleeping on machine speed. The points are
`CHECKPOINTS`.
"""

from __future__ import annotations

import os
import signal
import sys
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PHASES = ("start", "train", "done")
# Where `reached` is called, in the order a MetaAPO run meets them (tests/test_preempt_phases.py).
CHECKPOINTS = (
    "imports", "config", "data", "model", "reference", "reward", "engine", "resume",
    "margins", "refit", "generate", "score", "step", "checkpoint_write", "export",
)
DEFAULT_EXIT = 85


class _State:
    def __init__(self) -> None:
        self.installed = False  # by an entry point: signals in start/done exit at once
        self.phase = "start"
        self.where = "imports"  # the last `reached` checkpoint, for the messages
        self.signal_name: str | None = None
        self.exit_code = int(os.environ.get("REQUEUE_EXIT", DEFAULT_EXIT))
        self.previous: dict = {}


_S = _State()


def install(exit_code: int | None = None) -> None:
    """Installs the exiting handler for SIGTERM and SIGUSR1 (entry points, first thing)."""
    if exit_code is not None:
        _S.exit_code = exit_code
    for sig in SIGNALS:
        try:
            _S.previous.setdefault(sig, signal.signal(sig, _handle))
        except ValueError:  # not the main thread: whoever owns it handles signals
            return
    _S.installed = True
    reached("imports")


def installed() -> bool:
    """Whether an entry point installed the exiting handler in this process."""
    return _S.installed


def set_exit_code(code: int) -> None:
    """The requeue status (``checkpoint.requeue_exit_code``), once the config is read."""
    _S.exit_code = code


def exit_code() -> int:
    return _S.exit_code


def signalled() -> str | None:
    """The name of the first signal this process received (None: none)."""
    return _S.signal_name


def forget() -> None:
    """Clears the recorded signal (an in-process run starting after an earlier one)."""
    _S.signal_name = None


def enter(phase: str) -> None:
    """Moves to `phase` (see the module docstring)."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r}; one of {PHASES}")
    _S.phase = phase


def phase() -> str:
    return _S.phase


def reached(where: str) -> None:
    """Marks a point of the run (the messages name it) and applies the test hook."""
    _S.where = where
    hook = os.environ.get("METAAPO_SIGNAL_AT", "")
    if not hook:
        return
    points = hook.split(",")
    for i, point in enumerate(points):
        name, _, sig = point.partition(":")
        if name == where:  # each point fires once, in order of arrival
            os.environ["METAAPO_SIGNAL_AT"] = ",".join(points[:i] + points[i + 1:])
            os.kill(os.getpid(), getattr(signal, sig or "SIGUSR1"))
            return


def record(signum: int) -> str:
    """Records a signal (first one wins) and writes the launcher's marker; returns its name."""
    name = signal.Signals(signum).name
    if _S.signal_name is None:
        _S.signal_name = name
    marker = os.environ.get("METAAPO_PREEMPT_MARKER")
    if marker:
        try:
            with open(marker, "a") as f:
                f.write(f"{time.time():.3f} {name} rank {os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}"
                        f" pid {os.getpid()} during {_S.where} ({_S.phase})\n")
        except OSError:
            pass  # the exit status still says it
    return name


def exit_now() -> None:
    """Leaves with the requeue status, skipping interpreter teardown (nothing is left to save)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_S.exit_code)


def _handle(signum, frame) -> None:  # noqa: ARG001
    name = record(signum)
    if _S.phase == "train":
        print(f"\n{name} received during {_S.where}: the run checkpoints at its next check point "
              f"and exits {_S.exit_code}", file=sys.stderr, flush=True)
        return
    what = ("nothing was trained since the newest checkpoint" if _S.phase == "start"
            else "the checkpoint is written")
    print(f"\n{name} received during {_S.where}: {what}; exiting {_S.exit_code} so the job is "
          "requeued", file=sys.stderr, flush=True)
    exit_now()


def restore() -> None:
    """Puts back the handlers `install` replaced (tests)."""
    for sig, prev in _S.previous.items():
        signal.signal(sig, prev)
    _S.previous.clear()
    _S.installed = False
