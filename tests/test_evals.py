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
