"""CPU tests of metaapo_nemo.data: loading, validation, tokenisation, batching, toy data."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from metaapo_nemo.data import (
    TOY_SAMPLE_PATH,
    BadRowError,
    ChatTemplateError,
    DataSpec,
    TokenizedPair,
    collate_pairs,
    epoch_order,
    load_preference_data,
    split_pairs,
)
from tasks import toy_prefs as toy

CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' -}}"
    "{%- if not loop.last or add_generation_prompt -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def make_tokenizer() -> Any:
    """The project's tiny ChatML tokenizer, or an equivalent one built here."""
    try:
        from metaapo_nemo.models.tiny import build_tokenizer
    except ImportError:
        try:
            from metaapo_nemo.models.tokenizer import build_tokenizer
        except ImportError:
            build_tokenizer = _fallback_tokenizer
    return build_tokenizer(vocab_size=512)


def _fallback_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = [m["content"] for r in toy.make_toy_rows(64, 1) for m in r["chosen"] + r["rejected"]]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|pad|>", chat_template=CHATML)


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


def good_row(i: int = 0) -> dict:
    prompt = f"What is {i} + 1?"
    user = {"role": "user", "content": prompt}
    return {
        "prompt": prompt, "prompt_id": str(i),
        "chosen": [user, {"role": "assistant", "content": f"{i} + 1 = {i + 1}."}],
        "rejected": [dict(user), {"role": "assistant", "content": f"It is {i + 7}, I think."}],
        "score_chosen": 9.0, "score_rejected": 2,
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with path.open("wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode() + b"\n")
    return path


def load(path: Path, tok: Any, **kwargs: Any):
    return load_preference_data(DataSpec(path=str(path), **kwargs), tok)


# ----------------------------------------------------------------------------- the sample


def test_sample_loads_clean(tok: Any) -> None:
    data = load(TOY_SAMPLE_PATH, tok)
    assert len(data) == 256 and data.skipped == {}
    assert data.truncated == {"chosen": 0, "rejected": 0}
    assert [p.index for p in data.pairs] == list(range(256))
    header = tok.apply_chat_template([{"role": "user", "content": "x"}],
                                     add_generation_prompt=True, return_dict=False)
    for pair in data.pairs:
        assert pair.chosen_ids[-1] == pair.rejected_ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in pair.chosen_ids[:-1]
        assert pair.prompt_ids[-3:] == tuple(header[-3:])  # "<|im_start|>assistant\n"
        assert pair.chosen_ids != pair.rejected_ids
    rows = [json.loads(line) for line in TOY_SAMPLE_PATH.read_text().splitlines()]
    first = data.pairs[0]
    assert tok.decode(first.chosen_ids) == rows[0]["chosen"][-1]["content"] + "<|im_end|>"
    assert tok.decode(first.prompt_ids).endswith(rows[0]["prompt"] +
                                                 "<|im_end|>\n<|im_start|>assistant\n")


def test_sample_is_toy_output_and_small(tmp_path: Path) -> None:
    toy.main(["--out", str(tmp_path / "t.jsonl"), "--n", "256", "--seed", "0"])
    assert (tmp_path / "t.jsonl").read_bytes() == TOY_SAMPLE_PATH.read_bytes()
    assert TOY_SAMPLE_PATH.stat().st_size < 200_000
    rows = toy.make_toy_rows(256, 0)
    assert rows == toy.make_toy_rows(256, 0) and rows != toy.make_toy_rows(256, 1)
    words = [len(r[k][-1]["content"].split()) for r in rows for k in ("chosen", "rejected")]
    assert 5 <= min(words) and max(words) <= 60
    assert all(1 <= r["score_rejected"] < r["score_chosen"] <= 10 for r in rows)
    assert any(r["chosen"][0]["role"] == "system" for r in rows)


def test_limit(tok: Any) -> None:
    data = load(TOY_SAMPLE_PATH, tok, limit=10)
    assert [p.index for p in data.pairs] == list(range(10))


# ----------------------------------------------------------------------------- bad rows


def _set(path: str, value: Any):
    def mutate(row: dict) -> dict:
        *parents, last = path.split(".")
        target = row
        for key in parents:
            target = target[int(key) if key.lstrip("-").isdigit() else key]
        target[int(last) if last.lstrip("-").isdigit() else last] = value
        return row
    return mutate


def _delete(*path: Any):
    def mutate(row: dict) -> dict:
        target = row
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return row
    return mutate


BAD_ROWS = {
    # id: (mutation of good_row(1), reason, field named in the error)
    "missing_prompt": (_delete("prompt"), "missing_field", "prompt"),
    "missing_rejected": (_delete("rejected"), "missing_field", "rejected"),
    "missing_content": (_delete("chosen", 1, "content"), "missing_field", "chosen[1].content"),
    "prompt_not_str": (_set("prompt", 3), "wrong_type", "prompt"),
    "chosen_not_list": (_set("chosen", "hi"), "wrong_type", "chosen"),
    "chosen_empty": (_set("chosen", []), "wrong_type", "chosen"),
    "message_not_dict": (_set("rejected.0", "hi"), "wrong_type", "rejected[0]"),
    "content_not_str": (_set("chosen.1.content", 5), "wrong_type", "chosen[1].content"),
    "bad_role": (_set("chosen.0.role", "bot"), "bad_role", "chosen[0].role"),
    "last_not_assistant": (_set("rejected.1.role", "user"), "last_not_assistant",
                           "rejected[1].role"),
    "score_str": (_set("score_chosen", "high"), "bad_score", "score_chosen"),
    "score_bool": (_set("score_rejected", True), "bad_score", "score_rejected"),
    "empty_response": (_set("chosen.1.content", " \n "), "empty_response", "chosen[1].content"),
    "identical": (_set("rejected.1.content", "1 + 1 = 2."), "identical_responses",
                  "rejected[1].content"),
    "prompt_mismatch": (_set("rejected.0.content", "What is 2 + 1?"), "prompt_mismatch",
                        "rejected[0]"),
    "prompt_longer": (lambda row: {**row, "rejected": [{"role": "system", "content": "Hi."}]
                                   + row["rejected"]}, "prompt_mismatch", "rejected[0]"),
    "not_object": (lambda row: [row], "not_an_object", "<row>"),
}
RAW_BAD_LINES = {
    "bad_json": (b'{"prompt": "x", "chosen": [\n', "bad_json"),
    "bad_utf8": (json.dumps(good_row(1)).encode().replace(b"What", b"Wh\xe9t") + b"\n",
                 "bad_utf8"),
}


def _bad_file(tmp_path: Path, bad: Any) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", [good_row(0), bad, good_row(2)])


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_error_and_skip(kind: str, tok: Any, tmp_path: Path) -> None:
    mutate, reason, field = BAD_ROWS[kind]
    path = _bad_file(tmp_path, mutate(copy.deepcopy(good_row(1))))
    with pytest.raises(BadRowError) as info:
        load(path, tok)
    err = info.value
    assert (err.file, err.row, err.field, err.reason) == (str(path), 1, field, reason)
    assert str(path) in str(err) and "row 1" in str(err) and f"'{field}'" in str(err)
    assert "data.on_bad_row=skip" in str(err)
    data = load(path, tok, on_bad_row="skip")
    assert data.skipped == {reason: 1}
    assert [p.index for p in data.pairs] == [0, 2]


@pytest.mark.parametrize("kind", sorted(RAW_BAD_LINES))
def test_bad_line_error_and_skip(kind: str, tok: Any, tmp_path: Path) -> None:
    line, reason = RAW_BAD_LINES[kind]
    path = _bad_file(tmp_path, line)
    with pytest.raises(BadRowError, match=r"prefs\.jsonl: row 1: field '<line>'.*line 2") as info:
        load(path, tok)
    assert info.value.reason == reason
    assert load(path, tok, on_bad_row="skip").skipped == {reason: 1}


def test_row_numbers_count_blank_lines(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [good_row(0), b"\n", _set("prompt", 1)(good_row(2))])
    with pytest.raises(BadRowError, match="row 2: field 'prompt'"):
        load(path, tok)


def test_bad_row_in_json_file_via_datasets(tok: Any, tmp_path: Path) -> None:
    # datasets 5 keeps mixed-type columns as Json values, so the int prompt reaches us.
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([good_row(0), good_row(1), _set("prompt", 7)(good_row(2))]))
    with pytest.raises(BadRowError, match=r"prefs\.json: row 2: field 'prompt'"):
        load(path, tok)
    path.write_text(json.dumps([good_row(0), _delete("rejected")(good_row(1))]))
    assert load(path, tok, on_bad_row="skip").skipped == {"missing_field": 1}


def test_prompt_too_long_is_never_cut(tok: Any, tmp_path: Path) -> None:
    long_row = good_row(1)
    for side in ("chosen", "rejected"):
        long_row[side][0]["content"] = "Please answer. " * 40
    path = _bad_file(tmp_path, long_row)
    with pytest.raises(BadRowError, match="row 1: field 'prompt'.*max_prompt_length=64") as info:
        load(path, tok, max_prompt_length=64, max_length=128)
    assert info.value.reason == "prompt_too_long"
    data = load(path, tok, max_prompt_length=64, max_length=128, on_bad_row="skip")
    assert data.skipped == {"prompt_too_long": 1} and len(data) == 2
    assert all(len(p.prompt_ids) <= 64 for p in data.pairs)


def test_long_response_truncated_from_end(tok: Any, tmp_path: Path) -> None:
    row = good_row(0)
    row["rejected"][1]["content"] = "This answer goes on and on. " * 20
    data = load(write_jsonl(tmp_path / "p.jsonl", [row]), tok, max_prompt_length=32,
                max_length=48)
    (pair,) = data.pairs
    assert pair.rejected_truncated and not pair.chosen_truncated
    assert len(pair.prompt_ids) + len(pair.rejected_ids) == 48
    assert pair.rejected_ids[-1] != tok.eos_token_id  # eos was cut off
    assert pair.chosen_ids[-1] == tok.eos_token_id
    assert tok.decode(pair.rejected_ids).startswith("This answer goes on")
    assert data.truncated == {"chosen": 0, "rejected": 1}


def test_identical_after_truncation_is_a_bad_row(tok: Any, tmp_path: Path) -> None:
    row = good_row(0)
    row["chosen"][1]["content"] = "Same start. " * 20 + "Good end."
    row["rejected"][1]["content"] = "Same start. " * 20 + "Bad end."
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(BadRowError, match="data.max_length=48"):
        load(path, tok, max_prompt_length=32, max_length=48)
    data = load(path, tok, max_prompt_length=32, max_length=48, on_bad_row="skip")
    assert data.skipped == {"identical_after_truncation": 1}


# ----------------------------------------------------------------------------- sources


def test_jsonl_json_parquet_and_directory_agree(tok: Any, tmp_path: Path) -> None:
    import datasets

    rows = toy.make_toy_rows(12, 3)
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "c.parquet"))
    loaded = [load(tmp_path / name, tok) for name in ("a.jsonl", "b.json", "c.parquet")]
    assert loaded[0].pairs == loaded[1].pairs == loaded[2].pairs and len(loaded[0]) == 12
    assert loaded[0].source == str(jsonl)
    both = load(tmp_path, tok)  # sorted files, row indices continue across files
    assert len(both) == 36 and [p.index for p in both.pairs] == list(range(36))
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    write_jsonl(split_dir / "train_prefs-00000-of-00001.jsonl", rows[:5])
    write_jsonl(split_dir / "test_prefs-00000-of-00001.jsonl", rows[5:])
    assert len(load(split_dir, tok, split="train_prefs")) == 5
    assert len(load(split_dir, tok, split="train")) == 12  # no file of that split: all


def test_dataset_name_routes_to_load_dataset(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        return [good_row(0), good_row(1)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_preference_data(DataSpec("org/prefs", split="train_prefs"), tok)
    assert calls == [("org/prefs", "train_prefs")] and len(data) == 2
    assert "org/prefs" in data.source


def test_missing_file_and_bad_spec(tok: Any, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load(tmp_path / "nope.jsonl", tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load(tmp_path / "x.csv", tok)
    with pytest.raises(ValueError, match="max_prompt_length"):
        DataSpec("x", max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="on_bad_row"):
        DataSpec("x", on_bad_row="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- templates


def _with_template(template: str | None) -> Any:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_template_problems_are_clear(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [good_row(0)])
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        load(path, _with_template(None))
    # A generation header that the full rendering does not repeat.
    not_prefix = CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'")
    with pytest.raises(ChatTemplateError, match="row 0: chosen.*not prefix-consistent"):
        load(path, _with_template(not_prefix))
    no_eos = CHATML.replace("+ '<|im_end|>'", "+ '.'")
    with pytest.raises(ChatTemplateError, match="no eos token"):
        load(path, _with_template(no_eos))


def test_tokens_after_last_eos_are_dropped(tok: Any, tmp_path: Path) -> None:
    # Qwen-style: every message, the last one too, is followed by "\n".
    trailing = ("{%- for m in messages -%}"
                "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    path = write_jsonl(tmp_path / "p.jsonl", [good_row(0)])
    (pair,) = load(path, _with_template(trailing)).pairs
    assert pair.chosen_ids[-1] == tok.eos_token_id
    assert tok.decode(pair.chosen_ids) == "0 + 1 = 1.<|im_end|>"


# ----------------------------------------------------------------------------- collate


def test_collate_masks_prompt_and_shifts_labels() -> None:
    pad = 0
    pairs = [TokenizedPair(7, (11, 12, 13), (21, 22, 99), (31, 99)),
             TokenizedPair(8, (14,), (41, 42, 43, 44, 99), (51, 52, 99))]
    batch = collate_pairs(pairs, pad_id=pad, pad_to_multiple_of=4)
    ids, labels, mask = batch.input_ids_NT, batch.labels_NT, batch.loss_mask_NT
    assert ids.shape == (4, 8) and batch.num_pairs == 2 and batch.indices_B == (7, 8)
    assert ids[0].tolist() == [11, 12, 13, 21, 22, 99, 0, 0]  # chosen of pair 0
    assert ids[1].tolist() == [11, 12, 13, 31, 99, 0, 0, 0]  # its rejected, adjacent
    assert ids[2].tolist() == [14, 41, 42, 43, 44, 99, 0, 0]
    assert ids[3].tolist() == [14, 51, 52, 99, 0, 0, 0, 0]
    assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == pad).all()
    # Exactly the response tokens (eos 99 included) are unmasked targets.
    for row, (pair, side) in enumerate([(p, s) for p in pairs for s in ("chosen", "rejected")]):
        response = getattr(pair, f"{side}_ids")
        assert labels[row][mask[row].bool()].tolist() == list(response)
    assert batch.response_lengths_N.tolist() == [3.0, 2.0, 5.0, 3.0]
    assert mask.dtype == torch.float32 and labels.dtype == ids.dtype == torch.long


def test_collate_real_pairs_and_validate(tok: Any) -> None:
    data = load(TOY_SAMPLE_PATH, tok, limit=6)
    batch = collate_pairs(data.pairs, pad_id=tok.pad_token_id)
    batch.validate()
    assert batch.input_ids_NT.shape[0] == 12
    chosen_of_pair_1 = batch.input_ids_NT[2]
    assert chosen_of_pair_1[: len(data.pairs[1].prompt_ids)].tolist() == list(
        data.pairs[1].prompt_ids)
    broken = type(batch)(batch.input_ids_NT, batch.input_ids_NT.clone(), batch.loss_mask_NT,
                         batch.num_pairs, batch.pad_id)
    with pytest.raises(ValueError, match="labels_NT"):
        broken.validate()
    with pytest.raises(ValueError, match="at least one pair"):
        collate_pairs([], pad_id=0)


def test_split_pairs_keeps_order() -> None:
    pairs = [TokenizedPair(i, (1,), (2,), (3,)) for i in range(7)]
    chunks = split_pairs(pairs, 3)
    assert [len(c) for c in chunks] == [3, 2, 2] and sum(chunks, []) == pairs
    with pytest.raises(ValueError):
        split_pairs(pairs, 8)


def test_epoch_order_is_deterministic_permutation() -> None:
    order = epoch_order(100, seed=3, epoch=0)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert order == epoch_order(100, seed=3, epoch=0)
    assert order != epoch_order(100, seed=3, epoch=1) and order != epoch_order(100, 4, 0)
    assert epoch_order(1, 0, 0) == [0] and epoch_order(0, 0, 0) == []
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    epoch_order(10, 1, 1)  # must not touch the global RNG
    assert torch.equal(torch.rand(1), before)


def test_fallback_tokenizer_keeps_the_contract() -> None:
    # The stand-in used when metaapo_nemo.models has no tokenizer must stay usable.
    fallback = _fallback_tokenizer(400)
    data = load_preference_data(DataSpec(str(TOY_SAMPLE_PATH), limit=32), fallback)
    assert len(data) == 32 and data.skipped == {}
    assert all(p.chosen_ids[-1] == fallback.eos_token_id for p in data.pairs)


def test_chat_template_kwargs_reach_every_rendering(tmp_path: Path) -> None:
    """data.chat_template_kwargs (Qwen3's enable_thinking=false) go into the prompts AND the
    pairs: the prompt ends in the empty think block and each response still follows it."""
    from metaapo_nemo.data.preference import with_template_kwargs

    off = "(enable_thinking is defined and not enable_thinking)"
    think = (  # CHATML, with Qwen3's empty think block opening each assistant turn when thinking is off
        "{%- for m in messages -%}"
        "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
        "{%- if m['role'] == 'assistant' and " + off + " -%}{{- '<think></think>' -}}{%- endif -%}"
        "{{- m['content'] + '<|im_end|>' -}}"
        "{%- if not loop.last or add_generation_prompt -%}{{- '\\n' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
        "{%- if " + off + " -%}{{- '<think></think>' -}}{%- endif -%}{%- endif -%}")
    path = write_jsonl(tmp_path / "p.jsonl", [good_row(1)])
    plain = make_tokenizer()
    plain.chat_template = think
    bound = with_template_kwargs(make_tokenizer(), {"enable_thinking": False})
    bound.chat_template = think
    a, b = load(path, plain).pairs[0], load(path, bound).pairs[0]
    marker = bound.encode("<think></think>", add_special_tokens=False)
    assert list(b.prompt_ids[-len(marker):]) == marker and list(a.prompt_ids[-len(marker):]) != marker
    assert b.chosen_ids == a.chosen_ids and b.rejected_ids == a.rejected_ids
    assert with_template_kwargs(plain, {}) is plain
