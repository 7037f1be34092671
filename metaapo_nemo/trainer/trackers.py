"""Experiment trackers chosen by ``logging.trackers`` (TensorBoard, Weights & Biases, MLflow).

Each is a loop callback on the main rank: every step's numeric metrics as ``train/<name>``
at the optimiser step, every round's as ``round/<name>``, the resolved config once.
metrics.jsonl / rounds.jsonl in the run directory are written whatever is chosen.

W&B is an optional extra (``pip install -e '.[wandb]'``; it installs beside the pins). Its
run id is derived from the run directory, so a resumed or requeued job continues the same
W&B run; ``logging.wandb_mode=offline`` (or ``WANDB_MODE=offline``) writes run_dir/wandb/
for a later ``wandb sync`` from a machine with internet.

MLflow is the ``[mlflow]`` extra (``mlflow-skinny``, the tracking client; installs on both
stacks). Its server (``logging.mlflow_tracking_uri`` or ``MLFLOW_TRACKING_URI``) or, with
neither, a file store in run_dir/mlruns. MLflow chooses run ids itself, so the run carries a
tag derived from the run directory, and a resumed or requeued job finds that run and
continues it (status back to RUNNING; a preempted attempt ends KILLED, not FINISHED).
"""


from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path
from typing import Any

from metaapo_nemo.config.schema import Config, ConfigError
from metaapo_nemo.trainer.callbacks import TrainState


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


RUN_KEY_TAG = "metaapo_nemo.run_key"


def run_key(run_dir: Path) -> str:
    """The tracker identity of a run directory: a resumed job in the same directory has it."""
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


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
        run_id = run_key(run_dir)
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


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"train.lr": "1e-05", ...}: a config as MLflow params (strings, dotted keys)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: str(tree)[:6000]}  # MLflow's param value limit


class MlflowCallback:
    """Logs to MLflow (main rank only): step and round metrics, the resolved config as
    params (once, when the run is created) and as run_dir's config.yaml artifact."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool):
        self.client, self.run_id = None, None
        if not enabled:
            return
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("logging.trackers names mlflow, but MLflow is not installed: "
                              "pip install -e '.[mlflow]', or drop mlflow from logging.trackers") from None
        from metaapo_nemo.config.loader import to_yaml

        lg = cfg.logging
        uri = lg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            uri = (Path(run_dir).resolve() / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked:
            # the user chose a local store (or none), so this process asks.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.requeue_exit_code = cfg.checkpoint.requeue_exit_code
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(lg.mlflow_experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(lg.mlflow_experiment)
        key = run_key(run_dir)
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'",
                                        max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, tags={RUN_KEY_TAG: key, "run_dir": str(run_dir)},
                                         run_name=cfg.run.name)
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _flat(cfg.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, to_yaml(cfg), "config.yaml")

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def on_step_end(self, state: TrainState) -> None:
        if self.client is not None:
            self._log({f"train/{k}": v for k, v in _numeric(state.metrics).items()}, state.step)

    def on_round_end(self, state: TrainState) -> None:
        if self.client is not None:
            rounds = {k: v for k, v in _numeric(state.metrics).items() if k.startswith("round/")}
            self._log(rounds, state.step)

    def on_train_end(self, state: TrainState) -> None:
        if self.client is not None:
            status = ("FINISHED" if state.exit_code == 0 else
                      "KILLED" if state.exit_code == self.requeue_exit_code else "FAILED")
            self.client.set_terminated(self.run_id, status=status)
            self.client = None


def tracker_callbacks(cfg: Config, run_dir: Path, is_main: bool) -> list[object]:
    """The callbacks of the trackers `cfg.logging.trackers` names, in that order."""
    from metaapo_nemo.config.loader import to_yaml
    from metaapo_nemo.trainer.summary import TensorBoardCallback

    makers = {"tensorboard": lambda: TensorBoardCallback(run_dir, is_main, to_yaml(cfg)),
              "wandb": lambda: WandbCallback(cfg, run_dir, is_main),
              "mlflow": lambda: MlflowCallback(cfg, run_dir, is_main)}
    return [makers[name]() for name in dict.fromkeys(cfg.logging.trackers)]
