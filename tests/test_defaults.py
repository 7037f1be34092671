"""Schema defaults are a product's defaults: no demo, toy or CPU-only value is one."""

from __future__ import annotations

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from metaapo_nemo.config.loader import _submodel, load_config
from metaapo_nemo.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    TinyModelConfig,
)

DEMO_MARKS = ("tasks.", "toy", "samples/", "tiny", "smollm2", "/tmp", "conf/")


def _defaults(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    out = {}
    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is TinyModelConfig:
            continue  # the tiny builder's own shape: set only by a config that asks for a tiny model
        if sub is not None:
            out.update(_defaults(sub, f"{prefix}{name}."))
        elif field.default is not PydanticUndefined:
            out[prefix + name] = field.default
    return out


def test_no_demo_value_is_a_schema_default():
    found = {k: v for k, v in _defaults(Config).items()
             if isinstance(v, str) and any(mark in v for mark in DEMO_MARKS)}
    assert not found


def test_what_a_recipe_must_name_has_no_default():
    for section, key in ((DataConfig, "path"), (RewardConfig, "backend"), (EvalConfig, "task")):
        assert section.model_fields[key].is_required(), (section.__name__, key)
    assert Config.model_fields["model"].is_required()


def test_dtype_and_eager_follow_the_machine():
    m = ModelConfig(tiny=TinyModelConfig())
    assert m.dtype == "auto" and m.resolved_dtype(on_gpu=True) == "bfloat16"
    assert m.resolved_dtype(on_gpu=False) == "float32"
    assert ModelConfig(tiny=TinyModelConfig(), fp8="hybrid").resolved_dtype(on_gpu=False) == "bfloat16"
    assert ModelConfig(tiny=TinyModelConfig(), dtype="float32").resolved_dtype(on_gpu=True) == "float32"
    r = RolloutConfig()
    assert r.enforce_eager is None and r.eager(on_gpu=False) and not r.eager(on_gpu=True)
    assert RolloutConfig(enforce_eager=True).eager(on_gpu=True)


def test_gpu_recipes_train_in_bf16_and_the_cpu_demos_in_fp32():
    for path in ("conf/llama31_8b_metaapo.yaml", "conf/llama31_70b_dpo.yaml", "conf/qwen25_7b_dpo.yaml"):
        assert load_config(path).model.resolved_dtype(on_gpu=True) == "bfloat16", path
    for path in ("conf/tiny_cpu.yaml", "conf/tiny_cpu_dpo.yaml"):
        assert load_config(path).model.dtype == "float32", path  # stated in the demo YAML


def test_default_round_size_makes_whole_steps_of_the_default_batch():
    from metaapo_nemo.config.schema import MetaAPOConfig, TrainConfig, round_size_error

    assert round_size_error(MetaAPOConfig().round_size, TrainConfig().global_batch_size) is None
