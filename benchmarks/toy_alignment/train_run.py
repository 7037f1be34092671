"""`recipes/metaapo.py`, unchanged, plus an HF export of the policy after every round.

The toy-alignment benchmark needs the policy at intermediate steps (gold reward vs steps,
vs annotations spent). This wrapper runs the recipe's own ``setup``/``train``/``finish``
(same command line, same config, same loop) and only adds one callback that writes
``<run_dir>/snapshots/step_XXXXX/`` (an HF checkpoint) at the end of each round.

    python benchmarks/toy_alignment/train_run.py --config conf/tiny_cpu.yaml [a.b=c ...]
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_recipe():
    spec = importlib.util.spec_from_file_location("metaapo_recipe", ROOT / "recipes" / "metaapo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
    from metaapo_nemo.trainer.entry import run_recipe

    recipe = _load_recipe()

    def setup(cfg):
        c = recipe.setup(cfg)
        c.callbacks.callbacks.append(SnapshotCallback(c))
        return c

    return run_recipe(recipe.__doc__, setup, recipe.train, recipe.finish, argv)


if __name__ == "__main__":
    sys.exit(main())
