"""Bad input, property-tested: whatever a dataset row or a config file holds, loading ends
in a valid result or in OUR error naming the file/row/key, never a traceback from deep
inside a library; a run that refuses its input leaves no run directory behind."""

from __future__ import annotations

import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaapo_nemo.config.loader import load_config
from metaapo_nemo.config.schema import ConfigError
from metaapo_nemo.data.preference import BadRowError, DataSpec, load_preference_data

EXAMPLES = 60  # per property; the README's reliability figures count these
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

text = st.text(alphabet=string.printable + "éß中\u2028", max_size=30)
scalar = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True), text)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]), "content": text}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), scalar, max_size=3),
    scalar,
)
conversation = st.one_of(st.lists(message, max_size=4), scalar)
row = st.dictionaries(
    st.sampled_from(["prompt", "chosen", "rejected", "messages", "prompt_id", "score_chosen", "extra"]),
    st.one_of(conversation, scalar), max_size=6)
line = st.one_of(row.map(json.dumps), text, st.just("{"), st.just("[]"), st.just("null"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


@SETTINGS
@given(lines=st.lists(line, min_size=1, max_size=6))
def test_any_dataset_row_loads_or_names_file_and_row(tokenizer, tmp_path, lines):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    spec = DataSpec(str(path), "train", 64, 32, "error", None)
    try:
        data = load_preference_data(spec, tokenizer)
    except BadRowError as e:
        assert "prefs.jsonl" in str(e) and "row" in str(e), str(e)
        assert 0 <= e.row < len(lines)
    else:
        assert all(p.chosen_ids and p.rejected_ids for p in data.pairs)
    skip = load_preference_data(DataSpec(str(path), "train", 64, 32, "skip", None), tokenizer)
    assert len(skip.pairs) + sum(skip.skipped.values()) <= len([ln for ln in lines if ln.strip()])


SECTIONS = ["run", "model", "parallel", "data", "optim", "train", "loss", "reference", "metaapo",
            "rollout", "reward", "checkpoint", "bogus"]
KEYS = ["name", "seed", "tp", "pp", "lr", "global_batch_size", "micro_batch_size", "beta", "type",
        "round_size", "t_meta", "sampling", "every_steps", "path", "tiny", "max_length", "nope"]
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                     max_leaves=6)
document = st.one_of(
    st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(KEYS), value, max_size=3),
                    max_size=4),
    value,
)


@SETTINGS
@given(doc=document, raw=st.one_of(st.none(), st.sampled_from(["a: [", "\t- x", ":", "defaults: [nope.yaml]"])))
def test_any_config_file_validates_or_names_the_key(tmp_path, doc, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(doc, allow_unicode=True))
    try:
        load_config(str(path), method="dpo")  # as recipes/dpo.py loads it
    except ConfigError as e:
        assert str(e).strip()  # a message, naming the file or the key (checked below for keys)
        if raw is None and isinstance(doc, dict) and "bogus" in doc:
            assert "bogus" in str(e)


@SETTINGS
@given(key=st.lists(st.sampled_from(SECTIONS[:-1] + KEYS), min_size=1, max_size=3).map(".".join),
       val=st.one_of(text, st.sampled_from(["[", "{a: 1", "1e400", "-1", "null", "yes"])))
def test_any_override_validates_or_names_the_key(key, val):
    try:
        load_config(None, [f"{key}={val}"])
    except ConfigError as e:
        assert key.split(".")[0] in str(e) or "override" in str(e), str(e)


@pytest.mark.parametrize("case", ["bad_row", "missing_file", "bad_key"])
def test_refused_input_leaves_no_run_directory(tmp_path, case, capsys):
    from metaapo_nemo import run as R
    from metaapo_nemo.config.loader import REPO_ROOT

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "hi", "chosen": [{"role": "user"}], "rejected": 3}\n')
    extra = {"bad_row": [f"data.path={data}"], "missing_file": [f"data.path={tmp_path / 'none.jsonl'}"],
             "bad_key": ["train.global_batch_sise=8"]}[case]
    out = tmp_path / "runs"
    try:
        rc = R.main([f"run.output_dir={out}", f"run.cache_dir={REPO_ROOT / '.cache'}", *extra], method="dpo")
    except SystemExit as e:  # argparse-level config errors exit from parse()
        rc = e.code
    assert rc == 2
    assert "error" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
