"""The MetaAPO training path (`recipes/metaapo.py`, unchanged) plus an HF export of the policy
after every round.

The toy-alignment benchmark needs the policy at intermediate steps (gold reward vs steps,
vs annotations spent). This wrapper runs the library entry the recipe runs
(`metaapo_nemo.run.main`: same command line, same config, same loop) and only adds one
callback that writes ``<run_dir>/snapshots/step_XXXXX/`` (an HF checkpoint) at each round end.

    python benchmarks/toy_alignment/train_run.py --config conf/tiny_cpu.yaml [a.b=c ...]
"""

from __future__ import annotations

import sys


class SnapshotCallback:
    """Exports the policy as an HF checkpoint at every round end."""

    def __init__(self, c):
        self.c = c

    def on_round_end(self, state) -> None:
        from metaapo_nemo.models.convert import export_hf

        c = self.c
        export_hf(c.policy.modules(), c.policy.arch, c.ctx, c.model_dir,
                  c.run_dir / "snapshots" / f"step_{state.step:05d}")


def main(argv: list[str] | None = None) -> int:
    from metaapo_nemo.run import main as run_main

    return run_main(argv, method="metaapo", doc=__doc__,
                    extend=lambda run: run.callbacks.callbacks.append(SnapshotCallback(run)))


if __name__ == "__main__":
    sys.exit(main())
