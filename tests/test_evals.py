"""The end-of-run evaluation registry: names, ``module:function``, failures at build time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from metaapo_nemo import evals
from metaapo_nemo.config.schema import ConfigError, EvalConfig


def _noop(cfg, ctx, policy, model_dir, run_dir):
    return {"ran": True}


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(evals, "_EVALS", {})


def test_registered_name_and_module_function(clean_registry):
    evals.register_eval("noop", _noop)
    evals.register_eval("noop", _noop)  # the same function again is fine
    assert evals.get_eval("noop") is _noop and evals.registered_evals() == ["noop"]
    assert evals.get_eval("tests.test_evals:_noop") is _noop
    with pytest.raises(ValueError, match="already registered"):
        evals.register_eval("noop", lambda *a: None)
    with pytest.raises(ValueError, match="reserved for 'module:function'"):
        evals.register_eval("a:b", _noop)


@pytest.mark.parametrize(
    "name, message",
    [
        ("ifeval", r"eval.task='ifeval' is not a registered evaluation \(registered: none\)"),
        ("no_such_module_q9:run", "eval.task='no_such_module_q9:run': cannot import module"),
        ("tests.test_evals:nope", "has no attribute 'nope'"),
    ],
)
def test_bad_names_are_config_errors(clean_registry, name, message):
    with pytest.raises(ConfigError, match=message):
        evals.get_eval(name)


def test_eval_task_has_no_default():
    with pytest.raises(ValidationError, match="task"):
        EvalConfig.model_validate({})


def test_build_refuses_a_bad_eval_before_starting(clean_registry):
    from metaapo_nemo.run import build

    cfg = SimpleNamespace(eval=SimpleNamespace(task="tests.test_evals:nope"))  # read first, alone
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        build(cfg, "dpo")


def test_build_refuses_every_steps_for_an_eval_without_step(clean_registry):
    from metaapo_nemo.run import build

    evals.register_eval("noop", _noop)
    cfg = SimpleNamespace(eval=SimpleNamespace(task="noop", every_steps=2))
    with pytest.raises(ConfigError, match=r"eval.every_steps=2 .* takes no `step` argument"):
        build(cfg, "dpo")


def test_every_steps_evaluates_during_training_without_changing_it(clean_registry, tmp_path):
    """eval.every_steps=2 over 6 steps: points at steps 2 and 4 (the final evaluation is the
    last), with the policy as trained so far; the training itself is bit for bit the same."""
    import json

    from metaapo_nemo import run as R

    calls: list = []

    def record(cfg, ctx, policy, model_dir, run_dir, step=None):
        weight = next(p for p in policy.modules()[0].parameters() if p.requires_grad)
        calls.append((step, float(weight.detach().double().sum())))

    evals.register_eval("rec", record)
    base = [f"run.output_dir={tmp_path}", "train.progress_bar=off", "train.max_steps=6", "eval.task=rec",
            "train.save_final_hf=false"]
    assert R.main([*base, "run.name=plain"], method="dpo") == 0
    plain, calls[:] = list(calls), []
    assert R.main([*base, "run.name=curve", "eval.every_steps=2"], method="dpo") == 0
    assert [s for s, _ in plain] == [None] and [s for s, _ in calls] == [2, 4, None]
    assert calls[-1][1] == plain[-1][1] and len({v for _, v in calls}) == 3  # the policy moved between points

    def losses(name):
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("curve") == losses("plain")
