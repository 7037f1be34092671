"""Config system: every recipe validates, inheritance, overrides, errors that say the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from metaapo_nemo.config import (
    CONF_DIR,
    DEFAULT_RECIPE,
    DEFAULT_RECIPES,
    Config,
    ConfigError,
    ModelConfig,
    TinyModelConfig,
    check_layout,
    load_config,
    to_yaml,
)
from metaapo_nemo.config.cli import (
    build_arg_parser,
    dry_run_report,
    estimate_params,
    parse,
    read_model_dims,
    world_size_from_env,
)
from metaapo_nemo.config.loader import read_yaml, schema_paths, suggest_keys
from metaapo_nemo.config.schema import RolloutConfig

RECIPES = sorted(p for p in CONF_DIR.rglob("*.yaml") if "base" not in p.relative_to(CONF_DIR).parts)
PARTIALS = sorted((CONF_DIR / "base").glob("*.yaml"))


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- recipes


def test_recipes_found():
    names = {p.name for p in RECIPES}
    assert {"tiny_cpu.yaml", "tiny_cpu_dpo.yaml", "tiny_cpu_qwen2.yaml", "tiny_cpu_ipo.yaml"} <= names
    assert {"tiny_cpu_simpo.yaml", "tiny_cpu_kto.yaml"} <= names
    assert {p.name for p in PARTIALS} >= {"common.yaml", "dpo.yaml"}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_every_recipe_validates_under_its_own_method(recipe):
    cfg = load_config(recipe)  # every recipe states (or inherits) its method
    assert isinstance(cfg, Config) and cfg.method in ("dpo", "metaapo")
    assert load_config(recipe, method=cfg.method) == cfg  # what its recipe script loads
    other = {"dpo": "metaapo", "metaapo": "dpo"}[cfg.method]
    assert f"runs method={cfg.method}" in _config_error(recipe, method=other)
    if cfg.method == "dpo":  # an offline config holds no MetaAPO section (an eval engine at most)
        assert cfg.metaapo is None and cfg.reward is None
        assert cfg.rollout is None or cfg.eval is not None
    else:
        assert cfg.metaapo is not None and cfg.rollout is not None
        assert cfg.reward is not None or cfg.metaapo.sampling == "none"
    p = cfg.parallel
    # the smallest world it fits (expert parallelism needs ep | dp x cp)
    check_layout(cfg, p.tp * p.pp * p.cp * (p.ep // math.gcd(p.ep, p.cp)), read_model_dims(cfg))


def _partial_method(partial: Path) -> str:
    tree = read_yaml(partial)
    return "metaapo" if {"metaapo", "reward"} & set(tree) or "release_metaapo" in partial.name else "dpo"


@pytest.mark.parametrize("partial", PARTIALS, ids=lambda p: p.name)
def test_base_partials_validate_with_a_model(partial):
    # a context long enough for every partial (the release's max_length is 4096); the data
    # path for partials that leave it to the recipe
    over = ["model.tiny.arch=llama", "model.tiny.max_position_embeddings=4096"]
    if "data" not in read_yaml(partial) and "release_metaapo" not in partial.name:
        over.append("data.path=prefs.jsonl")
    cfg = load_config(partial, over, method=_partial_method(partial))
    assert cfg.model.tiny == TinyModelConfig(max_position_embeddings=4096)


def test_default_recipe():
    assert DEFAULT_RECIPE == DEFAULT_RECIPES["metaapo"] == CONF_DIR / "tiny_cpu.yaml"
    assert DEFAULT_RECIPES["dpo"] == CONF_DIR / "tiny_cpu_dpo.yaml"
    cfg = load_config(None)
    assert (cfg.run.name, cfg.method) == ("tiny_cpu", "metaapo")
    dpo = load_config(None, method="dpo")
    assert (dpo.run.name, dpo.method) == ("tiny_cpu_dpo", "dpo")
    # the same demo model, data and schedule; MetaAPO's sections (and its row layout) differ
    for section in ("model", "data", "optim", "loss", "reference", "parallel"):
        assert getattr(dpo, section) == getattr(cfg, section), section
    assert dpo.train.model_copy(update={"batching": cfg.train.batching}) == cfg.train
    assert cfg.model.tiny is not None and cfg.model.tiny.arch == "llama" and cfg.model.path is None
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (256, 128)
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (8, 2)
    assert cfg.optim.lr == pytest.approx(5e-4)
    assert cfg.loss.name == "dpo"
    assert cfg.train.micro_batches_per_step(dp=1) == 4


@pytest.mark.parametrize(
    ("recipe", "name", "loss"),
    [
        ("tiny_cpu_ipo.yaml", "tiny_cpu_ipo", "ipo"),
        ("tiny_cpu_simpo.yaml", "tiny_cpu_simpo", "simpo"),
        ("tiny_cpu_kto.yaml", "tiny_cpu_kto", "kto"),
    ],
)
def test_loss_recipes_inherit_tiny_cpu_dpo(recipe, name, loss):
    base, cfg = load_config(None, method="dpo"), load_config(CONF_DIR / recipe)
    assert (cfg.run.name, cfg.loss.name) == (name, loss)
    assert cfg.model == base.model and cfg.train == base.train
    # only the learning rate may differ (IPO's squared loss wants a smaller one)
    assert cfg.optim.model_copy(update={"lr": base.optim.lr}) == base.optim


def test_qwen2_recipe():
    cfg = load_config("conf/tiny_cpu_qwen2.yaml")
    assert cfg.model.tiny.arch == "qwen2"
    assert cfg.model.tiny.hidden_size == load_config(None).model.tiny.hidden_size


def test_recipe_found_by_short_name():
    assert load_config("tiny_cpu_ipo").loss.name == "ipo"


# ---------------------------------------------------------------- schema


def test_every_model_forbids_extra_keys():
    def models(cls: type[BaseModel]):
        yield cls
        for field in cls.model_fields.values():
            for sub in (field.annotation, *getattr(field.annotation, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    yield from models(sub)

    for cls in models(Config):
        assert cls.model_config.get("extra") == "forbid", cls


def test_model_needs_exactly_one_source():
    with pytest.raises(ValueError, match="got neither"):
        ModelConfig()
    with pytest.raises(ValueError, match="got both"):
        ModelConfig(path="/ckpt", tiny=TinyModelConfig())
    msg = _config_error(None, ["model.path=/ckpt"])
    assert "model.tiny=null" in msg
    assert load_config(None, ["model.path=/ckpt", "model.tiny=null"]).model.path == "/ckpt"


def test_schema_paths_cover_sections_and_leaves():
    paths = schema_paths()
    assert paths["model.tiny"] is True and paths["model.tiny.arch"] is False
    assert "defaults" not in paths
    assert list(paths)[:3] == ["method", "run", "run.name"]


# ---------------------------------------------------------------- inheritance


def test_defaults_merge_in_list_order_then_own_keys(tmp_path):
    _write(tmp_path / "zz_first.yaml", "run: {name: first, seed: 1}\noptim: {lr: 1.0e-3}\n")
    _write(tmp_path / "zz_second.yaml", "run: {name: second}\ntrain: {max_steps: 7}\n")
    top = _write(
        tmp_path / "top.yaml",
        "defaults: [zz_first.yaml, zz_second.yaml]\nmodel: {tiny: {arch: qwen2}}\n"
        "train: {max_steps: 9}\n",
    )
    cfg = load_config(top, ["data.path=prefs.jsonl"], method="dpo")
    assert cfg.run.name == "second"  # later default wins
    assert cfg.run.seed == 1  # deep merge keeps sibling keys
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.max_steps == 9  # the file's own keys beat its defaults


def test_defaults_chain_through_repo_recipe(tmp_path):
    mid = _write(tmp_path / "zz_mid.yaml", "defaults: [tiny_cpu_ipo.yaml]\nrun: {name: mid}\n")
    top = _write(tmp_path / "zz_top.yaml", f"defaults: [{mid}]\ntrain: {{max_steps: 3}}\n")
    cfg = load_config(top)
    assert (cfg.run.name, cfg.loss.name, cfg.train.max_steps) == ("mid", "ipo", 3)
    assert cfg.model.tiny.arch == "llama"


def test_lists_and_null_replace(tmp_path):
    top = _write(tmp_path / "zz.yaml", "defaults: [tiny_cpu.yaml]\nmodel: {tiny: null, path: /x}\n")
    cfg = load_config(top)
    assert cfg.model.tiny is None and cfg.model.path == "/x"


def test_defaults_cycle(tmp_path):
    _write(tmp_path / "zz_a.yaml", "defaults: [zz_b.yaml]\n")
    _write(tmp_path / "zz_b.yaml", "defaults: [zz_a.yaml]\n")
    msg = _config_error(tmp_path / "zz_a.yaml")
    assert "defaults cycle:" in msg
    assert "zz_a.yaml -> " in msg and "zz_b.yaml -> " in msg and msg.count("zz_a.yaml") == 2


def test_self_include_is_a_cycle(tmp_path):
    assert "defaults cycle" in _config_error(_write(tmp_path / "zz.yaml", "defaults: [zz.yaml]\n"))


def test_missing_default_entry(tmp_path):
    msg = _config_error(_write(tmp_path / "zz.yaml", "defaults: [nope/missing.yaml]\n"))
    assert "defaults entry 'nope/missing.yaml'" in msg and "zz.yaml" in msg


def test_defaults_must_be_a_list(tmp_path):
    msg = _config_error(_write(tmp_path / "zz.yaml", "defaults: {a: 1}\n"))
    assert "must be a list of file paths" in msg


# ---------------------------------------------------------------- overrides


def test_overrides_parse_types():
    cfg = load_config(
        None,
        [
            "optim.lr=1e-5",
            "train.save_final_hf=false",
            "train.max_steps=null",
            "data.limit=100",
            "run.name=exp:1",
            "model.tiny.rope_theta=5e5",
            "model.tiny.tie_word_embeddings=true",
        ],
    )
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.train.save_final_hf is False
    assert cfg.train.max_steps is None
    assert cfg.data.limit == 100
    assert cfg.run.name == "exp:1"
    assert cfg.model.tiny.rope_theta == pytest.approx(5e5)
    assert cfg.model.tiny.tie_word_embeddings is True


def test_override_list_value_is_parsed_then_rejected_by_type():
    msg = _config_error(None, ["run.seed=[1,2]"])
    assert "run.seed" in msg and "valid integer" in msg


def test_override_dict_value_and_interpolation():
    cfg = load_config(None, ["model.tiny={arch: qwen2, num_layers: 4}", "data.split=${run.name}"])
    assert (cfg.model.tiny.arch, cfg.model.tiny.num_layers) == ("qwen2", 4)
    assert cfg.model.tiny.hidden_size == 128  # dict overrides merge
    assert cfg.data.split == "tiny_cpu"


def test_override_into_null_section(tmp_path):
    cfg = load_config(None, ["model.tiny=null", "model.tiny.arch=qwen2"])
    assert cfg.model.tiny == TinyModelConfig(arch="qwen2")


def test_yaml_floats_without_dot(tmp_path):
    top = _write(tmp_path / "zz.yaml", "defaults: [tiny_cpu.yaml]\noptim: {lr: 3e-4}\n")
    assert load_config(top).optim.lr == pytest.approx(3e-4)


def test_override_must_have_equals():
    assert "must look like key=value" in _config_error(None, ["train.max_steps"])


def test_unknown_key_in_override_suggests_closest():
    msg = _config_error(None, ["train.lr_rate=3"])
    assert msg.startswith("unknown config key 'train.lr_rate' (from override 'train.lr_rate=3')")
    assert "did you mean: optim.lr" in msg


def test_unknown_nested_key_in_dict_override():
    msg = _config_error(None, ["model.tiny={arc: qwen2}"])
    assert "unknown config key 'model.tiny.arc'" in msg and "model.tiny.arch" in msg


def test_unknown_key_in_yaml_names_file_and_suggests(tmp_path):
    top = _write(tmp_path / "zz.yaml", "defaults: [tiny_cpu.yaml]\ntrain:\n  micro_batch: 4\n")
    msg = _config_error(top)
    assert "unknown config key 'train.micro_batch'" in msg
    assert f"in {top}" in msg
    assert "train.micro_batch_size" in msg


def test_unknown_top_level_key_lists_sections():
    msg = _config_error(None, ["zzz=1"])
    assert "valid keys at the top level: method, run, model, parallel" in msg


def test_suggestions_match_leaf_and_path():
    assert suggest_keys("optimizer.lr")[0] in ("optim.lr", "optim")
    assert suggest_keys("loss.bta")[0] == "loss.beta"
    assert "loss" not in suggest_keys("loss.bta")  # ancestors are valid, not suggestions


# ---------------------------------------------------------------- value and cross-field errors


def test_pydantic_errors_list_key_value_reason():
    msg = _config_error(None, ["train.micro_batch_size=0", "loss.name=orpo", "optim.lr=-1"])
    assert msg.startswith("invalid config (conf/tiny_cpu.yaml train.micro_batch_size=0")
    assert "train.micro_batch_size=0: Input should be greater than 0" in msg
    assert "loss.name=orpo: Input should be 'dpo', 'ipo', 'simpo' or 'kto'" in msg
    assert "optim.lr=-1: Input should be greater than 0" in msg
    assert "Traceback" not in msg and "errors.pydantic.dev" not in msg


def test_batch_arithmetic_error():
    msg = _config_error(None, ["train.global_batch_size=10", "train.micro_batch_size=4"])
    assert (
        "train.global_batch_size=10 is not divisible by train.micro_batch_size=4 x "
        "data-parallel size 1 = 4; use a global batch of 8 or 12, or micro_batch_size "
        "1, 2, 5 or 10"
    ) in msg


def test_prompt_length_error():
    msg = _config_error(None, ["data.max_prompt_length=256"])
    assert "data.max_prompt_length=256 must be < data.max_length=256" in msg
    assert "use data.max_prompt_length=128 or data.max_length=512" in msg


def test_label_smoothing_range_and_loss_specific():
    assert "loss.label_smoothing=0.5: Input should be less than 0.5" in _config_error(
        None, ["loss.label_smoothing=0.5"]
    )
    msg = _config_error(None, ["loss.name=ipo", "loss.label_smoothing=0.1"])
    assert "loss.label_smoothing=0.1 only applies to loss.name dpo or simpo" in msg
    assert load_config(None, ["loss.label_smoothing=0.2"]).loss.label_smoothing == 0.2


def test_tiny_model_shape_errors():
    msg = _config_error(None, ["model.tiny.hidden_size=130"])
    assert "model.tiny.hidden_size=130 is not divisible by model.tiny.num_attention_heads=4" in msg
    assert "130 / 4 = 32.5" in msg and "hidden_size 128 or 132" in msg
    msg = _config_error(None, ["model.tiny.num_key_value_heads=3"])
    assert "num_attention_heads=4 is not divisible by model.tiny.num_key_value_heads=3" in msg
    msg = _config_error(None, ["data.max_length=2048"])
    assert "data.max_length=2048 exceeds model.tiny.max_position_embeddings=1024" in msg


def test_parallel_section_errors():
    assert "parallel.vpp=2 needs parallel.pp > 1" in _config_error(None, ["parallel.vpp=2"])
    msg = _config_error(None, ["parallel.sequence_parallel=true"])
    assert "parallel.sequence_parallel=true needs parallel.tp > 1 (tp=1)" in msg


def test_check_layout_uses_world_size_and_model_dims():
    cfg = load_config(None)
    assert check_layout(cfg, 4, read_model_dims(cfg)).dp == 4
    msg = str(pytest.raises(ConfigError, check_layout, cfg, 3, None).value)
    assert "train.global_batch_size=8 is not divisible by train.micro_batch_size=2 x " in msg
    assert "data-parallel size 3 = 6; use a global batch of 6 or 12" in msg
    cfg = load_config(None, ["parallel.tp=4", "model.tiny.num_attention_heads=8"])
    kv_error = r"parallel.tp=4 does not divide model.num_key_value_heads=2"
    with pytest.raises(ConfigError, match=kv_error):
        check_layout(cfg, 4, read_model_dims(cfg))
    hf_names = {"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4}
    with pytest.raises(ConfigError, match=r"parallel.pp=2 does not divide model.num_layers=3"):
        check_layout(load_config(None, ["parallel.pp=2"]), 2, hf_names)


def test_micro_batches_per_step():
    train = load_config(None).train
    assert train.micro_batches_per_step(2) == 2
    with pytest.raises(ConfigError, match="data-parallel size 3"):
        train.micro_batches_per_step(3)


# ---------------------------------------------------------------- files


def test_missing_file_lists_recipes():
    msg = _config_error("conf/does_not_exist.yaml")
    assert "config file not found: conf/does_not_exist.yaml" in msg
    assert "conf/tiny_cpu.yaml" in msg and "conf/tiny_cpu_kto.yaml" in msg


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "run:\n  name: x\n  seed: [1, 2\noptim: {}\n")
    msg = _config_error(bad)
    assert msg.startswith(f"malformed YAML in {bad} at line ")
    assert "line 4" in msg or "line 3" in msg


def test_top_level_must_be_mapping(tmp_path):
    assert "must hold a mapping" in _config_error(_write(tmp_path / "zz.yaml", "- 1\n- 2\n"))


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(CONF_DIR / "tiny_cpu_simpo.yaml", ["optim.lr=1e-5", "data.limit=10"])
    text = to_yaml(cfg)
    assert text.startswith("method: dpo\n")
    assert text.index("run:") < text.index("model:") < text.index("reference:")
    assert "defaults" not in text
    assert "metaapo:" not in text and "rollout:" not in text and "reward:" not in text
    assert load_config(_write(tmp_path / "dump.yaml", text)) == cfg


@pytest.mark.parametrize("recipe", ["tiny_cpu.yaml", "smollm2_dpo.yaml", "smollm2_metaapo.yaml"])
def test_to_yaml_round_trip_of_each_method(recipe, tmp_path):
    cfg = load_config(CONF_DIR / recipe)
    text = to_yaml(cfg)
    assert load_config(_write(tmp_path / "dump.yaml", text), method=cfg.method) == cfg
    if cfg.method == "dpo":  # its eval engine's keys only
        tree = yaml.safe_load(text)
        assert "metaapo" not in tree and "reward" not in tree
        assert set(tree["rollout"]) == set(RolloutConfig.ENGINE_KEYS)


# ---------------------------------------------------------------- methods


def test_offline_config_refuses_a_rollout_key_naming_it():
    msg = _config_error(None, ["rollout.samples_per_prompt=4"], method="dpo")
    assert (
        "rollout.samples_per_prompt is a MetaAPO key; conf/tiny_cpu_dpo.yaml runs the offline method "
        "(method=dpo, recipes/dpo.py), which generates nothing: remove the rollout section or run "
        "recipes/metaapo.py"
    ) in msg


def test_offline_config_refuses_metaapo_and_reward_sections(tmp_path):
    top = _write(tmp_path / "zz.yaml", "defaults: [tiny_cpu_dpo.yaml]\nmetaapo: {t_meta: 2, round_size: 16}\n"
                 "reward: {backend: rule, callable: 'tasks.toy_rules:score'}\n")
    msg = _config_error(top)
    assert "metaapo.round_size, metaapo.t_meta are MetaAPO keys" in msg
    assert "reward.backend, reward.callable are MetaAPO keys" in msg
    assert f"{top} runs the offline method (method=dpo, recipes/dpo.py)" in msg
    assert "remove the metaapo section or run recipes/metaapo.py" in msg


def test_offline_eval_reads_only_the_engine_keys_of_rollout():
    cfg = load_config("conf/smollm2_dpo.yaml", ["rollout.gpu_memory_utilization=0.3"])
    assert cfg.rollout.kv_cache_memory_mb == 1024 and cfg.rollout.gpu_memory_utilization == 0.3
    msg = _config_error("conf/smollm2_dpo.yaml", ["rollout.temperature=0.7"])
    assert "rollout.temperature is a MetaAPO key" in msg and "generates only for `eval`" in msg
    assert "its sampling comes from eval.*" in msg


def test_recipe_and_config_method_mismatch_is_refused():
    msg = _config_error("conf/tiny_cpu.yaml", method="dpo")
    assert msg == (
        "conf/tiny_cpu.yaml runs method=metaapo (recipes/metaapo.py), but recipes/dpo.py runs "
        "method=dpo: run it with recipes/metaapo.py, or give recipes/dpo.py a dpo config "
        "(e.g. conf/tiny_cpu_dpo.yaml)"
    )
    msg = _config_error("conf/tiny_cpu_kto.yaml", ["train.max_steps=2"], method="metaapo")
    assert "conf/tiny_cpu_kto.yaml runs method=dpo (recipes/dpo.py), but recipes/metaapo.py" in msg
    assert "runs method=metaapo" in _config_error("conf/tiny_cpu.yaml", ["method=dpo"], method="metaapo")


def test_config_without_method_needs_a_recipe(tmp_path):
    top = _write(tmp_path / "zz.yaml", "model: {tiny: {arch: llama}}\ndata: {path: prefs.jsonl}\n")
    assert "states no method: add `method: dpo`" in _config_error(top)
    assert load_config(top, method="dpo").method == "dpo"


def test_metaapo_needs_a_reward_model_and_has_no_demo_default():
    msg = _config_error(None, ["reward=null"])
    assert "reward: required, not set" in msg and "metaapo.sampling=meta" in msg
    assert load_config(None, ["reward=null", "metaapo.sampling=none"]).reward is None
    msg = _config_error(None, ["reward.backend=rule", "reward.tiny=null"])
    assert "reward.backend=rule needs reward.callable" in msg  # no toy rules by default
    msg = _config_error(None, ["reward.callable=tasks.toy_rules:score"])
    assert "reward.callable='tasks.toy_rules:score' is read only by reward.backend=rule" in msg
    assert "reward.backend: required" in _config_error(None, ["reward=null", "reward.path=/rm"])
    msg = _config_error(None, ["reward.backend=rule", "reward.callable=tasks.toy_rules:score"])
    assert "reward.tiny: read only by reward.backend=hf" in msg


def test_metaapo_refuses_what_it_would_ignore():
    msg = _config_error(None, ["reference.precompute=true"])
    assert "reference.precompute=true is an offline-method key" in msg and "margin pass" in msg
    msg = _config_error(None, ["loss.name=kto"])
    assert "loss.name=kto cannot run under MetaAPO" in msg and "recipes/dpo.py" in msg
    assert load_config(None, ["loss.name=kto"], method="dpo").loss.name == "kto"


def test_no_demo_values_as_schema_defaults():
    # a real recipe must name its data (and, under MetaAPO, its reward model)
    msg = _config_error(None, ["data={path: null}"])
    assert "data.path" in msg
    assert Config.model_fields["data"].is_required() and Config.model_fields["reward"].default is None


# ---------------------------------------------------------------- cli


def test_arg_parser_and_parse():
    args = build_arg_parser("x").parse_args(["--dry-run", "optim.lr=1e-4", "train.max_steps=2"])
    assert args.dry_run and args.config == str(DEFAULT_RECIPE)
    assert build_arg_parser("x", "dpo").parse_args([]).config == str(DEFAULT_RECIPES["dpo"])
    cfg, ns = parse(["--config", "conf/tiny_cpu_kto.yaml", "train.max_steps=2"], method="dpo")
    assert (cfg.loss.name, cfg.train.max_steps, ns.dry_run) == ("kto", 2, False)
    assert parse([], method="dpo")[0].method == "dpo"


def test_parse_exits_with_config_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["train.lr_rate=3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "config error" in err and "did you mean: optim.lr" in err and "Traceback" not in err


def test_world_size_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world_size_from_env() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from_env() == 4
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ConfigError, match="WORLD_SIZE='four'"):
        world_size_from_env()


def test_dry_run_report_contains_layout_and_arithmetic():
    cfg = load_config(None, ["parallel.tp=2"])
    report = dry_run_report(cfg, 4, read_model_dims(cfg))
    assert report.startswith("# resolved config\nmethod: metaapo\nrun:\n  name: tiny_cpu\n")
    assert "world_size=4 = tp 2 x cp 1 x pp 1 x dp 2" in report
    assert "rank  3 -> (dp=1, pp=0, tp=1)" in report
    assert "global_batch_size 8 / (micro_batch_size 2 x dp 2) = 2 micro-batches per step" in report
    assert "memory plan per GPU" in report


def test_dry_run_report_rejects_bad_layout():
    cfg = load_config(None, ["parallel.tp=3"])
    heads_error = "parallel.tp=3 does not divide model.num_attention_heads=4"
    with pytest.raises(ConfigError, match=heads_error):
        dry_run_report(cfg, 3, read_model_dims(cfg))


def test_read_model_dims_from_checkpoint_json(tmp_path):
    hf = {
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(None, [f"model.path={tmp_path}", "model.tiny=null"])
    dims = read_model_dims(cfg)
    assert (dims["num_layers"], dims["num_attention_heads"], dims["num_kv_heads"]) == (24, 14, 2)
    assert dims["vocab_size"] == 151936
    assert 0.45e9 < estimate_params(dims) < 0.55e9  # Qwen2-0.5B has 494M parameters
    report = dry_run_report(cfg, 2, dims)
    assert "params 494" in report or "params 49" in report
    missing = load_config(None, [f"model.path={tmp_path / 'nope'}", "model.tiny=null"])
    assert read_model_dims(missing) is None
    assert "the model's shape is unknown" in dry_run_report(missing, 1, None)


def test_recipe_refuses_a_config_of_the_other_method(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["--config", "conf/tiny_cpu.yaml"], method="dpo")  # what recipes/dpo.py runs
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "conf/tiny_cpu.yaml runs method=metaapo (recipes/metaapo.py), but recipes/dpo.py" in err
    from metaapo_nemo import run as R

    with pytest.raises(ConfigError, match="the config runs method=metaapo"):
        R.build(load_config(None), "dpo")  # refused before anything starts


def test_packing_with_interleaved_pipeline_is_refused_at_startup():
    """pack gives a varying micro-batch count per step; VPP needs a multiple of pp."""
    with pytest.raises(ConfigError, match="train.batching=pack .* parallel.vpp=2"):
        load_config(None, ["train.batching=pack", "parallel.pp=2", "parallel.vpp=2"], method="metaapo")


def test_context_parallelism_needs_thd_packed_rows():
    for method in ("dpo", "metaapo"):
        msg = _config_error(None, ["parallel.cp=2", "train.batching=bucket"], method=method)
        assert "parallel.cp=2: context parallelism splits every sequence of a THD-packed row" in msg
        assert "set train.batching=pack, train.pack_format=thd and train.share_prompt=false" in msg
        cfg = load_config(None, ["parallel.cp=2", "train.batching=pack", "train.pack_format=thd",
                                 "train.share_prompt=false"], method=method)
        assert cfg.parallel.cp == 2
