"""SLURM signals every process of a step, not only the rank: the helpers must survive it.

Found on the local cluster (tests/test_slurm_cluster.py): `--signal=USR1@N` killed the Manager
process megatron's checkpoint writer keeps after the first save (BrokenPipe/ConnectionReset at
the preemption save, exit 1, no requeue); and once the first rank exited 85, srun's
--kill-on-bad-exit SIGTERM killed the slower rank during teardown (143, no requeue).
Each check runs in a fresh interpreter (spawned helpers, signal dispositions, exit codes).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.dist_utils import worker_env

CHECK_QUEUE = """
import os, signal, sys, time

def main(fixed):
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from metaapo_nemo import checkpoint_model as checkpoint
    if fixed:
        checkpoint._signal_safe_results_queue()
    q = fa._get_write_results_queue()  # what every megatron save uses after the first one
    pid = q._manager._process.pid  # the manager process serving the queue
    os.kill(pid, signal.SIGUSR1)  # what SLURM sends to every process of the step
    os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    try:
        q.put("written"); print(q.get(timeout=5))
    except (OSError, EOFError) as exc:  # BrokenPipe / ConnectionReset / ConnectionRefused
        print("manager gone:", type(exc).__name__)

if __name__ == "__main__":
    main(sys.argv[1] == "fixed")
"""


def _run(tmp_path, code: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "check.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, "-W", "ignore", str(script), *args], capture_output=True,
                          text=True, timeout=120, env=worker_env())


def test_checkpoint_writer_queue_survives_slurm_signals(tmp_path):
    fixed = _run(tmp_path, CHECK_QUEUE, "fixed")
    assert fixed.stdout.strip() == "written", fixed.stderr[-2000:]


def test_megatrons_own_writer_queue_dies_of_usr1(tmp_path):
    """The cause, pinned: if megatron starts protecting its helper, the fix can go."""
    plain = _run(tmp_path, CHECK_QUEUE, "plain")
    assert plain.stdout.startswith("manager gone:"), plain.stdout + plain.stderr[-2000:]


EXIT_AFTER_SAVE = """
import os, signal, sys
from metaapo_nemo.trainer.resilience import Preemption

p = Preemption()
p.exit_when_signalled(85)  # the preemption checkpoint is written
if sys.argv[1] == "sigterm":  # srun --kill-on-bad-exit terminating a slower rank
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()
if sys.argv[1] == "restore":  # a single process (in-process tests) carries on as before
    p.restore()
sys.exit(0)  # teardown: the atexit exit keeps 85
"""


def test_a_preempted_rank_exits_85_on_a_late_sigterm_and_through_teardown(tmp_path):
    assert _run(tmp_path, EXIT_AFTER_SAVE, "sigterm").returncode == 85
    assert _run(tmp_path, EXIT_AFTER_SAVE, "teardown").returncode == 85
    assert _run(tmp_path, EXIT_AFTER_SAVE, "restore").returncode == 0
