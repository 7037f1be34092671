"""Preference pairs: load, validate and tokenise UltraFeedback-binarized style rows.

Row schema (``HuggingFaceH4/ultrafeedback_binarized``)::

    prompt: str
    chosen, rejected: list of {"role": "user" | "assistant" | "system", "content": str};
        the last message is the assistant response, the messages before it are the
        conversation prompt and must be identical between chosen and rejected (when
        there are none, ``[{"role": "user", "content": prompt}]`` is used)
    score_chosen, score_rejected: optional numbers
    prompt_id: optional

Sources: a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory of them, or a
dataset name for ``datasets.load_dataset(name, split=...)``. JSONL is read line by line
as bytes so that an undecodable or unparsable line is reported with its exact row;
``.json`` and ``.parquet`` go through ``datasets``. Row numbers are 0-based; for JSONL the
row number is the line number (blank lines are skipped but keep their number).

Every bad row either stops loading with a `BadRowError` naming the file, the row, the field
and the fix, or, with ``on_bad_row="skip"``, is dropped and counted under its reason (see
`SKIP_REASONS`). A prompt longer than ``max_prompt_length`` tokens is a bad row, never
cut. Responses longer than ``max_length - len(prompt)`` tokens are cut from the end
(which also drops their eos) and counted in `PreferenceData.truncated`; a pair whose two
responses become the same tokens after the cut is a bad row (``identical_after_truncation``).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

logger = logging.getLogger(__name__)

ROLES = ("user", "assistant", "system")
SUFFIX_BUILDERS = {".jsonl": None, ".json": "json", ".parquet": "parquet"}
SKIP_REASONS = (
    "bad_utf8", "bad_json", "not_an_object", "missing_field", "wrong_type", "bad_role",
    "last_not_assistant", "bad_score", "empty_response", "identical_responses",
    "prompt_mismatch", "prompt_too_long", "identical_after_truncation",
)
_SKIP_HINT = "set data.on_bad_row=skip to skip such rows"


@dataclass(frozen=True)
class DataSpec:
    """Where the preference data lives and how to cut it; mirrors the ``data`` config.

    Attributes:
        path: A .jsonl/.json/.parquet file, a directory of them, or a dataset name.
        split: Split for a dataset name; in a directory, files named ``<split>.*`` or
            ``<split>-*`` (HF shard names) are used when there are any, else all files.
        max_length: Most tokens of prompt + response; responses are cut to fit.
        max_prompt_length: Most prompt tokens (chat template and generation header
            included); longer prompts are bad rows.
        on_bad_row: ``"error"`` stops at the first bad row, ``"skip"`` counts and drops it.
        limit: Stop after this many valid pairs (``None``: all).
    """

    path: str
    split: str = "train"
    max_length: int = 512
    max_prompt_length: int = 256
    on_bad_row: Literal["error", "skip"] = "error"
    limit: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"need 0 < data.max_prompt_length < data.max_length, got "
                f"max_prompt_length={self.max_prompt_length}, max_length={self.max_length}: "
                f"a prompt of max_prompt_length tokens must leave room for a response"
            )
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"data.on_bad_row={self.on_bad_row!r}; use 'error' or 'skip'")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit={self.limit} must be >= 1 or null (all rows)")


class BadRowError(ValueError):
    """A source row that cannot become a training pair.

    Attributes:
        file: The file (or dataset name and split) the row came from.
        row: 0-based row number in that file.
        field: The offending field, e.g. ``chosen[1].content``.
        reason: The skip-counter key, one of `SKIP_REASONS`.
    """

    def __init__(self, file: str, row: int, field: str, reason: str, problem: str) -> None:
        self.file, self.row, self.field, self.reason = file, row, field, reason
        super().__init__(
            f"{file}: row {row}: field '{field}': {problem}. Fix the row, or {_SKIP_HINT} "
            f"(counted as '{reason}')"
        )


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot split a conversation into prompt + response."""


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids.

    Attributes:
        index: Row number in the source (for a directory: in the files concatenated in
            sorted order), unique per pair.
        prompt_ids: Chat-template prompt including the assistant generation header.
        chosen_ids: Chosen response tokens only, ending with eos unless truncated.
        rejected_ids: Rejected response tokens only, ending with eos unless truncated.
        chosen_truncated: The chosen response was cut to fit ``max_length``.
        rejected_truncated: The rejected response was cut to fit ``max_length``.
        prompt_messages: The conversation before the response, as (role, content) pairs
            (online generation's reward model applies its own chat template to it).
    """

    index: int
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    chosen_truncated: bool = False
    rejected_truncated: bool = False
    prompt_messages: tuple[tuple[str, str], ...] = ()

    @property
    def responses(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(chosen, rejected): a pair as a row-layout unit (`trainer.rows.Unit`)."""
        return (self.chosen_ids, self.rejected_ids)

    def messages(self) -> list[dict[str, str]]:
        """`prompt_messages` as chat-template dicts."""
        return [{"role": r, "content": c} for r, c in self.prompt_messages]


@dataclass
class PreferenceData:
    """Tokenised pairs plus what was dropped or cut on the way.

    Attributes:
        pairs: Valid pairs in source order.
        skipped: Skip reason -> number of rows dropped (only reasons that occurred).
        source: Human-readable description of where the rows came from.
        truncated: ``"chosen"`` / ``"rejected"`` -> number of responses cut to fit.
    """

    pairs: list[TokenizedPair]
    skipped: dict[str, int]
    source: str
    truncated: dict[str, int] = field(default_factory=lambda: {"chosen": 0, "rejected": 0})

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        """One log line: kept, skipped by reason, truncated."""
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (f"{self.source}: {len(self.pairs)} pairs; skipped {sum(self.skipped.values())}"
                f" ({skipped}); truncated chosen={self.truncated['chosen']} "
                f"rejected={self.truncated['rejected']}")


# ----------------------------------------------------------------------------- reading


def _resolve_files(spec: DataSpec) -> list[Path] | None:
    """Returns the local files to read, or None when ``spec.path`` is a dataset name."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        if path.suffix not in SUFFIX_BUILDERS:
            raise ValueError(f"data.path={spec.path}: unsupported file type '{path.suffix}'; "
                             f"use one of {sorted(SUFFIX_BUILDERS)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIX_BUILDERS)
        if not files:
            raise FileNotFoundError(f"data.path={spec.path} is a directory without "
                                    f"{'/'.join(sorted(SUFFIX_BUILDERS))} files")
        in_split = [p for p in files if p.stem == spec.split or p.stem.startswith(f"{spec.split}-")]
        return in_split or files
    if path.suffix in SUFFIX_BUILDERS or spec.path.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"data.path={spec.path} does not exist")
    return None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yields ``(row, record)``; a line that is not UTF-8 JSON yields a `BadRowError`."""
    with path.open("rb") as f:
        for row, raw in enumerate(f):
            if row == 0 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark some editors write
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8", errors="strict")
            except UnicodeDecodeError as e:
                yield row, BadRowError(
                    str(path), row, "<line>", "bad_utf8",
                    f"byte {e.start} ({raw[e.start:e.start + 1]!r}) of line {row + 1} is not "
                    f"valid UTF-8; re-encode the file as UTF-8")
                continue
            try:
                yield row, json.loads(text)
            except json.JSONDecodeError as e:
                yield row, BadRowError(str(path), row, "<line>", "bad_json",
                                       f"line {row + 1} is not valid JSON ({e.msg} at column "
                                       f"{e.colno})")


def _iter_with_datasets(path: Path, builder: str) -> Iterator[tuple[int, Any]]:
    import datasets

    ds = datasets.load_dataset(builder, data_files=[str(path)], split="train")
    yield from enumerate(ds)


def _iter_source(spec: DataSpec) -> tuple[str, Iterator[tuple[str, int, int, Any]]]:
    """Returns a description and an iterator of ``(file, row, index, record)``."""
    files = _resolve_files(spec)
    if files is None:
        def hub_rows() -> Iterator[tuple[str, int, int, Any]]:
            import datasets

            label = f"{spec.path}[{spec.split}]"
            for row, record in enumerate(datasets.load_dataset(spec.path, split=spec.split)):
                yield label, row, row, record

        return f"dataset {spec.path} split {spec.split}", hub_rows()

    def file_rows() -> Iterator[tuple[str, int, int, Any]]:
        offset = 0
        for path in files:
            builder = SUFFIX_BUILDERS[path.suffix]
            rows = _iter_jsonl(path) if builder is None else _iter_with_datasets(path, builder)
            last = -1
            for row, record in rows:
                yield str(path), row, offset + row, record
                last = row
            offset += last + 1

    source = str(files[0]) if len(files) == 1 else f"{spec.path} ({len(files)} files)"
    return source, file_rows()


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Row:
    """A validated row: the prompt messages and the two responses."""

    prompt_messages: list[dict[str, str]]
    chosen: dict[str, str]
    rejected: dict[str, str]


_Bad = Callable[[str, str, str], NoReturn]


def _messages(record: Mapping, key: str, bad: _Bad) -> list[dict[str, str]]:
    """Validates one message list and returns it reduced to ``{role, content}`` dicts."""
    value = record[key]
    if not isinstance(value, list) or not value:
        bad(key, "wrong_type", f"must be a non-empty list of {{role, content}} messages, "
                               f"got {type(value).__name__} {_short(value)}")
    out = []
    for i, msg in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(msg, Mapping):
            bad(where, "wrong_type", f"must be a {{role, content}} dict, got "
                                     f"{type(msg).__name__} {_short(msg)}")
        for part in ("role", "content"):
            if msg.get(part) is None:
                bad(f"{where}.{part}", "missing_field", "is missing")
            if not isinstance(msg[part], str):
                bad(f"{where}.{part}", "wrong_type",
                    f"must be a string, got {type(msg[part]).__name__} {_short(msg[part])}")
        if msg["role"] not in ROLES:
            bad(f"{where}.role", "bad_role", f"is {msg['role']!r}; use one of {ROLES}")
        out.append({"role": msg["role"], "content": msg["content"]})
    if out[-1]["role"] != "assistant":
        bad(f"{key}[{len(out) - 1}].role", "last_not_assistant",
            f"the last message must be the assistant response, got role {out[-1]['role']!r}")
    return out


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _validate_row(record: Any, file: str, row: int) -> _Row:
    """Checks one record against the schema; raises `BadRowError` on the first problem."""

    def bad(where: str, reason: str, problem: str) -> NoReturn:
        raise BadRowError(file, row, where, reason, problem)

    if not isinstance(record, Mapping):
        bad("<row>", "not_an_object", f"must be a JSON object, got {type(record).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if record.get(key) is None:
            bad(key, "missing_field", "is missing")
    if not isinstance(record["prompt"], str):
        bad("prompt", "wrong_type", f"must be a string, got {type(record['prompt']).__name__}")
    chosen = _messages(record, "chosen", bad)
    rejected = _messages(record, "rejected", bad)
    for key in ("score_chosen", "score_rejected"):
        score = record.get(key)
        if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                                  or not math.isfinite(score)):
            bad(key, "bad_score", f"must be a finite number when present, got {_short(score)}")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages[-1]["content"].strip():
            bad(f"{key}[{len(messages) - 1}].content", "empty_response",
                "the response is empty or only whitespace")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        bad(f"rejected[{len(rejected) - 1}].content", "identical_responses",
            "the rejected response equals the chosen one, so the pair carries no preference")
    if chosen[:-1] != rejected[:-1]:
        i = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), 0)
        bad(f"rejected[{i}]", "prompt_mismatch", f"the prompt messages before the response "
            f"must equal chosen's; they first differ at message {i}")
    prompt_messages = chosen[:-1] or [{"role": "user", "content": record["prompt"]}]
    return _Row(prompt_messages, chosen[-1], rejected[-1])


# ----------------------------------------------------------------------------- tokenising


def _as_ids(out: Any) -> list[int]:
    """Normalises `apply_chat_template` output (list, BatchEncoding or tensor) to ids."""
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        assert len(out) == 1, "one conversation in, one id list out"
        out = out[0]
    return [int(t) for t in out]


def with_template_kwargs(tokenizer: Any, kwargs: Mapping[str, Any]) -> Any:
    """The tokenizer with ``kwargs`` (`data.chat_template_kwargs`) bound into every
    ``apply_chat_template`` call made through it, so the pairs, the rollout prompts and the
    evaluation render alike. Returns the same object."""
    if kwargs:
        tokenizer.apply_chat_template = functools.partial(tokenizer.apply_chat_template, **dict(kwargs))
    return tokenizer


def _apply(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    # transformers 5 returns a BatchEncoding unless return_dict=False.
    return _as_ids(tokenizer.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=True, return_dict=False))


def _check_tokenizer(tokenizer: Any) -> int:
    """Fails early on a tokenizer that cannot build pairs; returns its eos id."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"tokenizer {type(tokenizer).__name__} has no chat_template: preference pairs are "
            f"built by rendering messages with it; load an instruct/chat tokenizer or set "
            f"tokenizer.chat_template to a Jinja template")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ChatTemplateError("tokenizer has no eos_token_id: responses must end with the "
                                "end-of-turn token; set tokenizer.eos_token")
    return int(eos)


def _response_ids(tokenizer: Any, row: _Row, response: dict[str, str], prompt_ids: list[int],
                   eos_id: int, where: str) -> list[int]:
    """Tokenises prompt + response and returns the response part ending with eos."""
    full = _apply(tokenizer, row.prompt_messages + [response], generation_prompt=False)
    n = len(prompt_ids)
    if full[:n] != prompt_ids:
        first = next((i for i, (a, b) in enumerate(zip(full, prompt_ids)) if a != b),
                     min(len(full), n))
        raise ChatTemplateError(
            f"{where}: the chat template is not prefix-consistent: render(messages, "
            f"add_generation_prompt=True) is not a token prefix of render(messages + "
            f"[response]) (first difference at token {first}: "
            f"{tokenizer.decode(prompt_ids[first:first + 8])!r} vs "
            f"{tokenizer.decode(full[first:first + 8])!r}); use a template that renders the "
            f"earlier turns identically in both cases")
    ids = full[n:]
    if eos_id not in ids:
        raise ChatTemplateError(
            f"{where}: the rendered assistant response has no eos token "
            f"{tokenizer.convert_ids_to_tokens(eos_id)!r}, so the policy would never learn "
            f"to stop; set tokenizer.eos_token to the template's end-of-turn token")
    last_eos = len(ids) - 1 - ids[::-1].index(eos_id)
    return ids[: last_eos + 1]


def _tokenize_pair(row: _Row, tokenizer: Any, spec: DataSpec, eos_id: int, file: str,
                   row_number: int, index: int) -> TokenizedPair:
    """Tokenises a validated row; a too-long prompt or equal cut responses is a bad row."""
    prompt_ids = _apply(tokenizer, row.prompt_messages, generation_prompt=True)
    if len(prompt_ids) > spec.max_prompt_length:
        raise BadRowError(
            file, row_number, "prompt", "prompt_too_long",
            f"the templated prompt has {len(prompt_ids)} tokens > data.max_prompt_length="
            f"{spec.max_prompt_length} (prompts are never cut); raise data.max_prompt_length")
    budget = spec.max_length - len(prompt_ids)
    chosen = _response_ids(tokenizer, row, row.chosen, prompt_ids, eos_id,
                           f"{file}: row {row_number}: chosen")
    rejected = _response_ids(tokenizer, row, row.rejected, prompt_ids, eos_id,
                             f"{file}: row {row_number}: rejected")
    if chosen[:budget] == rejected[:budget]:
        raise BadRowError(
            file, row_number, "rejected", "identical_after_truncation",
            f"cut to the {budget} tokens that data.max_length={spec.max_length} leaves after "
            f"the prompt, chosen and rejected are the same tokens; raise data.max_length")
    return TokenizedPair(
        index=index, prompt_ids=tuple(prompt_ids),
        chosen_ids=tuple(chosen[:budget]), rejected_ids=tuple(rejected[:budget]),
        chosen_truncated=len(chosen) > budget, rejected_truncated=len(rejected) > budget,
        prompt_messages=tuple((m["role"], m["content"]) for m in row.prompt_messages))


def load_preference_data(spec: DataSpec, tokenizer: Any) -> PreferenceData:
    """Loads, validates and tokenises preference pairs.

    Args:
        spec: Source, lengths and bad-row policy.
        tokenizer: A transformers tokenizer with a chat template and an eos token.

    Returns:
        The valid pairs in source order with skip and truncation counts.

    Raises:
        BadRowError: On the first bad row when ``spec.on_bad_row == "error"``.
        ChatTemplateError: If the tokenizer has no chat template or eos token, or its
            template cannot be split into prompt + response tokens.
        FileNotFoundError: If a local ``spec.path`` does not exist.
    """
    eos_id = _check_tokenizer(tokenizer)
    source, rows = _iter_source(spec)
    pairs: list[TokenizedPair] = []
    skipped: Counter[str] = Counter()
    truncated = {"chosen": 0, "rejected": 0}
    for file, row, index, record in rows:
        try:
            if isinstance(record, BadRowError):
                raise record
            pair = _tokenize_pair(_validate_row(record, file, row), tokenizer, spec, eos_id,
                                  file, row, index)
        except BadRowError as e:
            if spec.on_bad_row == "error":
                raise
            if not skipped[e.reason]:
                logger.warning("skipping bad rows; first '%s': %s", e.reason, e)
            skipped[e.reason] += 1
            continue
        truncated["chosen"] += pair.chosen_truncated
        truncated["rejected"] += pair.rejected_truncated
        pairs.append(pair)
        if spec.limit is not None and len(pairs) >= spec.limit:
            break
    data = PreferenceData(pairs, dict(skipped), source, truncated)
    logger.info("%s", data.summary())
    return data
