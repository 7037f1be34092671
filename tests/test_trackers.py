"""logging.trackers: TensorBoard, Weights & Biases (offline mode, read back from its file) and
MLflow (a local file store, read back with MLflow's own client; a preempted and resumed run
continues the same MLflow run)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from metaapo_nemo.config.loader import load_config
from metaapo_nemo.config.schema import ConfigError
from metaapo_nemo.trainer.callbacks import TrainState
from metaapo_nemo.trainer.trackers import tracker_callbacks

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (a ':W&B' header, then LevelDB-log blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    block = 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def read_finished_wandb_records(path: Path, timeout_s: float = 60.0) -> list:
    """`read_wandb_records` once the run file holds its final ``exit`` record. W&B's service
    process writes the file; `finish()` can return before the last bytes are on disk (seen in
    CI's loaded stack tier: a record cut short, "Wire format was corrupt"), so read until the
    file parses and is complete."""
    import time

    from google.protobuf.message import DecodeError

    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            records = read_wandb_records(path)
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
            last = f"{len(records)} records, the last {records[-1].WhichOneof('record_type') if records else None}"
        except DecodeError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not complete after {timeout_s:.0f} s: {last}")
        time.sleep(0.2)


def test_default_is_tensorboard_and_unknown_trackers_are_refused():
    assert load_config("conf/tiny_cpu_dpo.yaml").logging.trackers == ["tensorboard"]
    with pytest.raises(ConfigError, match="logging.trackers"):
        load_config("conf/tiny_cpu_dpo.yaml", ["logging.trackers=[neptune]"])
    assert tracker_callbacks(load_config("conf/tiny_cpu_dpo.yaml", ["logging.trackers=[]"]), Path("."), True) == []


def test_wandb_offline_logs_steps_rounds_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed: pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, whatever the config says
    cfg = load_config("conf/tiny_cpu.yaml", ["logging.trackers=[tensorboard,wandb]", "run.name=tracked"])
    callbacks = tracker_callbacks(cfg, tmp_path, is_main=True)
    assert [type(c).__name__ for c in callbacks] == ["TensorBoardCallback", "WandbCallback"]
    st = TrainState(total_steps=2)
    for step, loss in ((1, 0.693), (2, 0.5)):
        st.step, st.metrics = step, {"loss": loss, "grad_norm": 1.5, "update_applied": True, "note": "x"}
        for c in callbacks:
            c.on_step_end(st)
    st.metrics = {"round/sampled": 5, "round/annotation_ratio": 0.625}
    for c in callbacks:
        c.on_round_end(st)
        c.on_train_end(st)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, config = {}, {}
    for r in read_finished_wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items.get("_step"), {}).update(items)
        elif kind in ("config", "run"):  # the resolved config arrives with the run record
            update = r.config.update if kind == "config" else r.run.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
    assert history[1]["train/loss"] == 0.693 and history[2]["train/loss"] == 0.5
    assert history[2]["round/sampled"] == 5 and "train/update_applied" not in history[1]
    assert config["run"]["name"] == "tracked" and config["method"] == "metaapo"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    # the same run directory continues the same W&B run (a resumed or requeued job)
    first_id = run_file.stem.removeprefix("run-")
    again = tracker_callbacks(cfg, tmp_path, is_main=True)[1]
    assert again.run.id == first_id
    again.on_train_end(st)


def test_other_ranks_track_nothing(tmp_path):
    cfg = load_config("conf/tiny_cpu.yaml", ["logging.trackers=[tensorboard,wandb]"])
    for c in tracker_callbacks(cfg, tmp_path, is_main=False):
        c.on_step_end(TrainState(step=1, metrics={"loss": 1.0}))
    assert not list(tmp_path.iterdir())


def test_mlflow_file_store_follows_a_preempted_run_to_its_end(tmp_path, monkeypatch):
    """Steps, the resolved config and the run's status through the real entry point: the run
    is signalled at step 3 (exit 85, the run KILLED), resumed in the same run directory, and
    MLflow holds ONE run with every step once, FINISHED."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed: pip install -e '.[mlflow]'")
    import os
    import signal

    from mlflow.tracking import MlflowClient

    from metaapo_nemo import run as R
    from metaapo_nemo.trainer.trackers import RUN_KEY_TAG, run_key

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlruns"
    args = [f"run.output_dir={tmp_path}", "run.name=tracked", "data.limit=16", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.progress_bar=off", "logging.trackers=[mlflow]",
            f"logging.mlflow_tracking_uri={store.as_uri()}", "logging.mlflow_experiment=trackers_test"]

    class _SignalAt3:
        def on_step_end(self, state) -> None:
            if state.step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    assert R.main(args, method="dpo", extend=lambda run: run.callbacks.callbacks.append(_SignalAt3())) == 85
    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("trackers_test")
    (first,) = client.search_runs([exp.experiment_id])
    assert first.info.status == "KILLED" and first.info.run_name == "tracked"
    assert first.data.tags[RUN_KEY_TAG] == run_key(tmp_path / "tracked")
    assert [m.step for m in client.get_metric_history(first.info.run_id, "train/loss")] == [1, 2, 3]

    assert R.main(args, method="dpo") == 0  # resumes from step 3's preemption checkpoint
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    rows = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert [(m.step, m.value) for m in losses] == [(r["step"], r["loss"]) for r in rows]
    assert len(rows) == 4 and run.data.params["method"] == "dpo" and run.data.params["train.micro_batch_size"] == "2"
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config.read_text())["logging"]["mlflow_experiment"] == "trackers_test"


def test_mlflow_missing_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_mlflow(name, *a, **k):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    cfg = load_config("conf/tiny_cpu_dpo.yaml", ["logging.trackers=[mlflow]"])
    with pytest.raises(ConfigError, match=r"pip install -e '.\[mlflow\]'"):
        tracker_callbacks(cfg, tmp_path, is_main=True)
