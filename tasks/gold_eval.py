"""Before/after evaluation of a policy on held-out prompts of a task with a gold score.

The engine behind ``eval.task`` functions such as `tasks.ifeval_eval.evaluate_run` and
`tasks.toy_eval.evaluate_run`: a `GoldTask` says which held-out prompts a setting means and
how one response is graded; everything else is shared. For a policy: greedy (temperature 0,
one response per prompt) and sampled (``eval.temperature``, ``eval.samples_per_prompt`` seeded
responses per prompt) generations, each graded; reported: the mean gold score and the fraction
of responses that are perfect ("all met").

In a recipe, `evaluate_run` runs at the end of training on every rank: a vLLM engine starts
from the initial checkpoint (``model.path``), evaluates it ("before"; cached under
``run.cache_dir/<task.cache_name>`` since it depends only on the checkpoint and the eval
settings), receives the trained policy's weights in memory (the same push as MetaAPO's refit)
and evaluates again ("after"). The main rank writes ``eval.json`` in the run directory and
appends a section to ``summary.md`` with ``eval.examples`` prompts and their greedy responses
before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaapo_nemo.evals import EVAL_CURVE

_AFTER_STEP = 1 << 30  # the engine's policy-step tag for the pushed final weights


@dataclass(frozen=True)
class EvalSettings:
    """Mirrors the ``eval`` config section (`config.schema.EvalConfig`)."""

    num_prompts: int = 64
    seed: int = 0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    samples_per_prompt: int = 2
    examples: int = 5
    first_prompt: int = 0  # prompts [first_prompt, first_prompt + num_prompts) of the held-out list

    @classmethod
    def from_config(cls, e: Any) -> EvalSettings:
        return cls(e.num_prompts, e.seed, e.max_new_tokens, e.temperature, e.top_p,
                   e.samples_per_prompt, e.examples, e.first_prompt)


@dataclass(frozen=True)
class GoldTask:
    """What differs between tasks: prompts, grading and how they are shown.

    Prompts are any objects with ``messages()`` (the chat turns the policy answers).
    """

    cache_name: str  # the "before" cache's folder under run.cache_dir
    title: str  # the summary.md section title
    gold_doc: str  # one sentence: what the gold score is
    heldout: Callable[[EvalSettings], list]  # the held-out prompts of these settings
    grade: Callable[[Any, str], tuple[float, bool]]  # (prompt, response) -> (gold, perfect)
    prompt_json: Callable[[Any], dict]  # a prompt as eval.json stores it (needs "prompt": text)
    label: Callable[[dict], str] = lambda p: ""  # a short tag of a stored prompt for the examples


GenerateFn = Callable[[Any, Any], list]  # (PromptBatch, SamplingSettings) -> [PromptSamples]


def prompt_ids(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Chat-template token ids (the model's default system prompt, as in training)."""
    out = []
    for p in prompts:
        ids = tokenizer.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def evaluate(task: GoldTask, generate: GenerateFn, ids: Sequence[Sequence[int]], prompts: Sequence[Any],
             s: EvalSettings) -> dict[str, Any]:
    """Greedy + sampled gold scores of one policy (whatever `generate` samples from)."""
    from metaapo_nemo.rollout.generator import PromptBatch, SamplingSettings

    t0 = time.perf_counter()
    batch = PromptBatch.build(ids, list(range(len(prompts))), round=0)
    modes = {"greedy": SamplingSettings(n=1, temperature=0.0, max_new_tokens=s.max_new_tokens, seed=s.seed),
             "sampled": SamplingSettings(n=s.samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
                                         max_new_tokens=s.max_new_tokens, seed=s.seed)}
    out: dict[str, Any] = {}
    for mode, settings in modes.items():
        groups = generate(batch, settings)
        texts = [[x.text for x in g.samples] for g in groups]
        graded = [[task.grade(p, t) for t in ts] for p, ts in zip(prompts, texts)]
        scores = [[g for g, _ in gs] for gs in graded]
        flat = [x for xs in scores for x in xs]
        out[mode] = {"gold": sum(flat) / len(flat),
                     "all_met": sum(ok for gs in graded for _, ok in gs) / len(flat),
                     "truncated": sum(x.truncated for g in groups for x in g.samples) / len(flat),
                     "responses": texts, "scores": scores}
    out["seconds"] = time.perf_counter() - t0
    return out


def cache_key(model_dir: Path, s: EvalSettings) -> str:
    """Depends on the checkpoint's files (names, sizes, config) and the eval settings."""
    h = hashlib.sha256(json.dumps(s.__dict__, sort_keys=True).encode())
    for f in sorted(Path(model_dir).iterdir()):
        if f.is_file():
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            if f.suffix in (".json", ".jinja"):
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _cached(path: Path, compute: Callable[[], dict], enabled: bool) -> dict:
    if enabled and path.is_file():
        return json.loads(path.read_text()) | {"cached": True}
    result = compute()
    if enabled:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # cells running at once may write it together
        tmp.write_text(json.dumps(result))
        tmp.replace(path)
    return result


class _Live:
    """One run's evaluation engine, kept between the points of ``eval.every_steps`` and the
    final evaluation: built once from the initial checkpoint, which it evaluates ("before")
    before any push."""

    def __init__(self, task: GoldTask, cfg: Any, ctx: Any, model_dir: Path):
        from transformers import AutoTokenizer

        from metaapo_nemo.config.loader import resolve_repo_path
        from metaapo_nemo.rollout.group import build_rollout_group

        self.s = s = EvalSettings.from_config(cfg.eval)
        self.prompts = task.heldout(s)
        self.ids = prompt_ids(AutoTokenizer.from_pretrained(str(model_dir)), self.prompts)
        rollout = cfg.rollout.model_copy(update={"max_new_tokens": s.max_new_tokens})
        longest = max(cfg.data.max_prompt_length, max(map(len, self.ids)))
        data = cfg.data.model_copy(update={"max_prompt_length": longest})
        # a LoRA policy is evaluated merged (push_megatron below): the engine needs no LoRA slots
        self.group = build_rollout_group(cfg.model_copy(update={"rollout": rollout, "data": data, "lora": None}),
                                         str(model_dir), ctx, 0)
        try:
            cache = resolve_repo_path(cfg.run.cache_dir) / task.cache_name / f"{cache_key(model_dir, s)}.json"
            self.before = _cached(cache, lambda: self.evaluate(task, 0),
                                  cfg.eval.cache_before and ctx.is_main and ctx.dims.world_size == 1)
        except BaseException:
            self.group.shutdown()
            raise

    def evaluate(self, task: GoldTask, step: int) -> dict:
        """The engine's policy (pushed for `step`; 0: the initial checkpoint) on the prompts."""
        return evaluate(task, lambda b, st: self.group.generate(b, st, step), self.ids, self.prompts, self.s)

    def evaluate_policy(self, task: GoldTask, cfg: Any, policy: Any, step: int) -> dict:
        self.group.push_megatron(policy.modules(), policy.arch, step, cfg.rollout.refit_bucket_mb << 20)
        try:
            return self.evaluate(task, step)
        finally:
            self.group.sleep()  # GPU: its memory goes back to training until the next point


_LIVE: dict[str, _Live] = {}  # run directory -> its evaluation engine (between eval.every_steps points)


def evaluate_run(task: GoldTask, cfg: Any, ctx: Any, policy: Any, model_dir: Path, run_dir: Path,
                 step: int | None = None) -> dict | None:
    """Before/after evaluation at the end of a recipe (call on every rank; no-op without ``eval``),
    or, with `step`, one point of the gold curve during training (``eval.every_steps``).

    Args:
        task: The task's prompts and grading.
        cfg: The validated `Config` (reads ``eval``, ``rollout``, ``data``, ``run``).
        ctx: The `ParallelContext`.
        policy: The `MegatronLM` (its weights are pushed into the eval engine).
        model_dir: The initial HF checkpoint (the "before" policy).
        run_dir: Where eval.json and summary.md go (a point: a line of eval_curve.jsonl with
            the greedy and sampled gold and the per-prompt scores).
        step: None at the end of training; else the optimiser steps done (the engine stays up
            for the next point and the final evaluation, which then reuse it).
    """
    if getattr(cfg, "eval", None) is None:
        return None
    key = str(run_dir)
    live = _LIVE.get(key) or _LIVE.setdefault(key, _Live(task, cfg, ctx, model_dir))
    if step is not None:
        try:
            point = live.evaluate_policy(task, cfg, policy, step)
        except BaseException:
            _LIVE.pop(key).group.shutdown()
            raise
        row = {"step": step, "seconds": point["seconds"]}
        for mode in ("greedy", "sampled"):
            row[mode] = {k: point[mode][k] for k in ("gold", "all_met", "truncated", "scores")}
        if ctx.is_main:
            with (run_dir / EVAL_CURVE).open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"eval at step {step}: greedy gold {row['greedy']['gold']:.3f}, "
                  f"sampled gold {row['sampled']['gold']:.3f} ({point['seconds']:.1f}s)", flush=True)
        return row
    try:
        after = live.evaluate_policy(task, cfg, policy, _AFTER_STEP)
    finally:
        _LIVE.pop(key).group.shutdown()
    s = live.s
    result = {"settings": s.__dict__, "prompts": [task.prompt_json(p) for p in live.prompts],
              "before": live.before, "after": after}
    if ctx.is_main:
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1))
        append_summary(task, run_dir, result)
        print(headline(result), flush=True)
    return result


def headline(result: dict) -> str:
    b, a = result["before"], result["after"]
    return (f"eval (held-out gold score, {len(result['prompts'])} prompts): greedy {b['greedy']['gold']:.3f} -> "
            f"{a['greedy']['gold']:.3f}, sampled {b['sampled']['gold']:.3f} -> {a['sampled']['gold']:.3f}")


def _annotation_ratio(run_dir: Path) -> float | None:
    rounds = run_dir / "rounds.jsonl"
    if not rounds.is_file():
        return None
    rows = [json.loads(x) for x in rounds.read_text().splitlines() if x.strip()]
    return rows[-1].get("annotation_ratio") if rows else None


def markdown(task: GoldTask, result: dict, annotation_ratio: float | None = None) -> str:
    """The eval section: table before/after, then example prompts with greedy responses."""
    b, a, s = result["before"], result["after"], result["settings"]
    lines = [f"## Held-out gold score ({task.title})", "",
             f"{len(result['prompts'])} held-out prompts; {task.gold_doc}; "
             f"sampled = {s['samples_per_prompt']} samples/prompt at T={s['temperature']}; "
             f"up to {s['max_new_tokens']} new tokens."]
    if annotation_ratio is not None:
        lines.append(f"Annotation ratio of the run: {annotation_ratio:.3f}.")
    lines += ["", "| | greedy gold | greedy all met | sampled gold | sampled all met |", "|---|---|---|---|---|"]
    for name, r in (("before", b), ("after", a)):
        lines.append(f"| {name} | {r['greedy']['gold']:.3f} | {r['greedy']['all_met']:.3f} | "
                     f"{r['sampled']['gold']:.3f} | {r['sampled']['all_met']:.3f} |")
    lines += ["", "### Examples (greedy)", ""]
    for i, p in enumerate(result["prompts"][: s["examples"]]):
        tag = task.label(p)
        lines += [f"**Prompt {i + 1}**{f' ({tag})' if tag else ''}: {_quote(p['prompt'])}", ""]
        for name, r in (("before", b), ("after", a)):
            lines += [f"- {name} (gold {r['greedy']['scores'][i][0]:.2f}): {_quote(r['greedy']['responses'][i][0])}"]
        lines.append("")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "`" + text.replace("`", "'").replace("\n", "\\n") + "`"


def append_summary(task: GoldTask, run_dir: Path, result: dict) -> Path:
    path = run_dir / "summary.md"
    head = "" if path.is_file() else f"# run summary: {run_dir.name}\n\n"
    with path.open("a") as f:
        f.write(head + "\n" + markdown(task, result, _annotation_ratio(run_dir)))
    return path


def evaluate_checkpoint(task: GoldTask, model_dir: str, s: EvalSettings, after_dir: str | None = None) -> dict:
    """Stand-alone: one vLLM engine (no training job), `model_dir` then optionally `after_dir`."""
    from transformers import AutoTokenizer

    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    prompts = task.heldout(s)
    ids = prompt_ids(AutoTokenizer.from_pretrained(model_dir), prompts)
    result: dict[str, Any] = {"settings": s.__dict__, "prompts": [task.prompt_json(p) for p in prompts]}
    for name, path in (("before", model_dir), ("after", after_dir)):
        if path is None:
            continue
        engine = VllmGenerator(EngineSettings(model_dir=path, seed=s.seed,
                                              max_model_len=max(map(len, ids)) + s.max_new_tokens))
        try:
            result[name] = evaluate(task, lambda b, st: engine.generate(b, st, 0), ids, prompts, s)
        finally:
            engine.shutdown()
    return result


def main(task: GoldTask, argv: list[str] | None, *, prog: str, description: str, model: str,
         num_prompts: int = EvalSettings.num_prompts, max_new_tokens: int = EvalSettings.max_new_tokens) -> int:
    """A task module's stand-alone command: evaluate ``--model`` (and ``--after``), print, save."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", default=model)
    parser.add_argument("--after", default=None, help="a trained checkpoint to compare with --model")
    parser.add_argument("--num-prompts", type=int, default=num_prompts)
    parser.add_argument("--samples", type=int, default=EvalSettings.samples_per_prompt)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--out", default=None, help="write the full result (JSON) here")
    args = parser.parse_args(argv)
    s = EvalSettings(num_prompts=args.num_prompts, samples_per_prompt=args.samples,
                     max_new_tokens=args.max_new_tokens)
    result = evaluate_checkpoint(task, args.model, s, args.after)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    for name in ("before", "after"):
        if name in result:
            r = result[name]
            print(f"{name}: greedy gold {r['greedy']['gold']:.3f} (all met {r['greedy']['all_met']:.3f}), "
                  f"sampled gold {r['sampled']['gold']:.3f} (all met {r['sampled']['all_met']:.3f})")
    return 0
