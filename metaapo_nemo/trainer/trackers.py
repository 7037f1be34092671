"""Experiment trackers chosen by ``logging.trackers`` (TensorBoard, Weights & Biases).

Each is a loop callback on the main rank: every step's numeric metrics as ``train/<name>``
at the optimiser step, every round's as ``round/<name>``, the resolved config once.
metrics.jsonl / rounds.jsonl in the run directory are written whatever is chosen.

W&B is an optional extra (``pip install -e '.[wandb]'``; it installs beside the pins). Its
run id is derived from the run directory, so a resumed or requeued job continues the same
W&B run; ``logging.wandb_mode=offline`` (or ``WANDB_MODE=offline``) writes run_dir/wandb/
for a later ``wandb sync`` from a machine with internet. MLflow is not offered
(`schema.MLFLOW_REFUSED` says why).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

from metaapo_nemo.config.schema import Config, ConfigError
from metaapo_nemo.trainer.callbacks import TrainState


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class WandbCallback:
    """Logs to Weights & Biases (main rank only)."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.trackers names wandb, but the wandb package is not installed: "
                              "pip install -e '.[wandb]', or drop wandb from logging.trackers") from None
        lg = cfg.logging
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(
            project=lg.wandb_project, entity=lg.wandb_entity, name=cfg.run.name, id=run_id,
            resume="allow", dir=str(run_dir), config=cfg.model_dump(mode="json"),
            mode=lg.wandb_mode or os.environ.get("WANDB_MODE") or "online",
            # the terminal is the run's story (console.py); W&B's own lines and its capture of
            # stdout would add to it
            settings=wandb.Settings(silent=True, console="off"),
        )

    def on_step_end(self, state: TrainState) -> None:
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in _numeric(state.metrics).items()}, step=state.step)

    def on_round_end(self, state: TrainState) -> None:
        if self.run is not None:
            rounds = {k: v for k, v in _numeric(state.metrics).items() if k.startswith("round/")}
            self.run.log(rounds, step=state.step)

    def on_train_end(self, state: TrainState) -> None:
        if self.run is not None:
            self.run.finish(exit_code=state.exit_code)
            self.run = None


def tracker_callbacks(cfg: Config, run_dir: Path, is_main: bool) -> list[object]:
    """The callbacks of the trackers `cfg.logging.trackers` names, in that order."""
    from metaapo_nemo.config.loader import to_yaml
    from metaapo_nemo.trainer.summary import TensorBoardCallback

    makers = {"tensorboard": lambda: TensorBoardCallback(run_dir, is_main, to_yaml(cfg)),
              "wandb": lambda: WandbCallback(cfg, run_dir, is_main)}
    return [makers[name]() for name in dict.fromkeys(cfg.logging.trackers)]
