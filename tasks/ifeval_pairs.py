"""Offline preference pairs for the IFEval-style task, from a policy OTHER than the trained one.

The offline policy is SmolLM2 itself under a different system prompt (`OFFLINE_SYSTEM`,
instead of the chat template's default one that training and evaluation use), sampling K
responses per train prompt with vLLM. Each sample is labelled by the gold score (the IFEval
checkers, `ifeval_task.gold_score`):

- the K scores differ: chosen = a best sample, rejected = a worst one (``source=samples``);
- all K tie below 1.0: chosen = a rule-built response (`rule_response`, template text made
  to satisfy every constraint, kept only if the checkers give it 1.0), rejected = the first
  sample (``source=rule``);
- otherwise (all perfect, or no rule-built response reaches 1.0): no pair, counted.

Rows follow the UltraFeedback-binarized schema (`metaapo_nemo.data.preference`), plus the
constraint spec and provenance (ignored by the loader):

    python -m tasks.ifeval_pairs \\
        --model .cache/smollm2/hf --prompts 192 --out metaapo_nemo/data/samples/ifeval_smollm2_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from tasks.ifeval_task import TOPICS, TaskPrompt, gold_score, make_prompts

OFFLINE_SYSTEM = ("You are a chatty, enthusiastic assistant. Answer in your own style and "
                  "share whatever you find interesting.")


def _body_sentences(p: TaskPrompt, keywords: Sequence[str]) -> list[str]:
    words = TOPICS[p.split][p.topic]
    topic = p.topic[0].upper() + p.topic[1:]
    out = [f"{topic} is worth a closer look"]
    if keywords:
        out.append(f"It is about {' and '.join(keywords)}")
    out += [f"Start with the {words[0]} and the {words[1]}", f"Then think about the {words[2]}",
            f"People enjoy the {words[3]} most", f"Keep the {words[4]} in mind",
            "Take your time and have fun", "Small steps add up over time"]
    return out


def rule_response(p: TaskPrompt, body_count: int | None = None) -> str:
    """A template response built to satisfy `p`'s constraints (check it with the gold score).

    Args:
        p: The prompt.
        body_count: Sentences in the body (None: as few as the constraints allow, more for
            "at least N words").
    """
    spec = {c.id: c.args() for c in p.constraints}
    keywords = spec.get("keywords:existence", {}).get("keywords", [])
    body = _body_sentences(p, keywords)
    bullets = spec.get("detectable_format:number_bullet_lists", {}).get("num_bullets")
    words = spec.get("length_constraints:number_words")
    if body_count is None:
        body_count = bullets or (2 if keywords else 1)
        while words and words["relation"] == "at least" and body_count < len(body):
            text = rule_response(p, body_count)
            if _count_words(text) >= words["num_words"]:
                break
            body_count += 1
    highlights = spec.get("detectable_format:number_highlighted_sections", {}).get("num_highlights", 0)
    body = body[:max(body_count, bullets or 0, highlights)]
    for i in range(min(highlights, len(body))):
        head, _, last = body[i].rpartition(" ")
        body[i] = f"{head} *{last}*"
    lines = []
    if "detectable_format:title" in spec:
        lines.append(f"<<{p.topic.title()}>>")
    if bullets:
        lines += [f"* {s}." for s in body[:bullets]]
    else:
        lines.append(" ".join(f"{s}." for s in body))
    if "detectable_content:postscript" in spec:
        lines.append(f"{spec['detectable_content:postscript']['postscript_marker']} Enjoy it.")
    if "startend:end_checker" in spec:
        lines.append(spec["startend:end_checker"]["end_phrase"])
    text = "\n".join(lines)
    if "startend:quotation" in spec:
        text = f'"\n{text}\n"' if bullets else f'"{text}"'  # a bullet must start its line
    if "detectable_format:json_format" in spec:
        text = json.dumps({"answer": text})
    if "change_case:english_lowercase" in spec:
        text = text.lower()
    if "change_case:english_capital" in spec:
        text = text.upper()
    return text


def _count_words(text: str) -> int:
    import re

    return len(re.findall(r"\w+", text))


def label(p: TaskPrompt, samples: Sequence[str]) -> tuple[dict | None, str]:
    """The preference row for `p` from its offline samples, or (None, why-not)."""
    samples = [s for s in samples if s.strip()]
    if not samples:
        return None, "no_nonempty_sample"
    scores = [gold_score(p.constraints, s, p.text) for s in samples]
    hi = max(range(len(scores)), key=lambda i: scores[i])
    lo = min(range(len(scores)), key=lambda i: scores[i])
    if scores[hi] > scores[lo]:
        return _row(p, samples[hi], scores[hi], samples[lo], scores[lo], "samples"), "samples"
    if scores[hi] >= 1.0:
        return None, "all_samples_perfect"
    rule = rule_response(p)
    rule_score = gold_score(p.constraints, rule, p.text)
    if rule_score <= scores[0]:
        return None, "rule_response_not_better"
    return _row(p, rule, rule_score, samples[0], scores[0], "rule"), "rule"


def _row(p: TaskPrompt, chosen: str, sc: float, rejected: str, sr: float, source: str) -> dict:
    user = {"role": "user", "content": p.text}
    return {"prompt": p.text, "prompt_id": p.key,
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
            "score_chosen": sc, "score_rejected": sr, "source": source,
            "instruction_id_list": [c.id for c in p.constraints],
            "kwargs": [c.args() for c in p.constraints]}


def sample_offline(model_dir: str, prompts: Sequence[TaskPrompt], k: int, temperature: float,
                   max_new_tokens: int, seed: int, system: str = OFFLINE_SYSTEM) -> list[list[str]]:
    """K vLLM samples per prompt from `model_dir` under the system prompt `system`."""
    from transformers import AutoTokenizer

    from metaapo_nemo.rollout.generator import PromptBatch, SamplingSettings
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok.apply_chat_template([{"role": "system", "content": system}] + p.messages(),
                                   add_generation_prompt=True, tokenize=True) for p in prompts]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    longest = max(len(x) for x in ids) + max_new_tokens
    engine = VllmGenerator(EngineSettings(model_dir=model_dir, seed=seed, max_model_len=longest,
                                          kv_cache_memory_bytes=512 << 20))
    try:
        batch = PromptBatch.build(ids, list(range(len(prompts))), round=0)
        groups = engine.generate(batch, SamplingSettings(n=k, temperature=temperature, top_p=1.0,
                                                         max_new_tokens=max_new_tokens, seed=seed), 0)
    finally:
        engine.shutdown()
    return [[s.text for s in g.samples] for g in groups]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.ifeval_pairs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=".cache/smollm2/hf", help="HF checkpoint of the offline policy")
    parser.add_argument("--prompts", type=int, default=192, help="train prompts to sample")
    parser.add_argument("--seed", type=int, default=0, help="prompt generation and sampling seed")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default="metaapo_nemo/data/samples/ifeval_smollm2_pairs.jsonl")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    prompts = make_prompts("train", args.prompts, args.seed)
    samples = sample_offline(args.model, prompts, args.k, args.temperature, args.max_new_tokens, args.seed)
    counts: Counter = Counter()
    rows = []
    for p, s in zip(prompts, samples):
        row, why = label(p, s)
        counts[why] += 1
        if row is not None:
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    all_scores = [gold_score(p.constraints, x, p.text) for p, s in zip(prompts, samples) for x in s]
    print(json.dumps({"out": str(out), "rows": len(rows), "prompts": len(prompts), "outcomes": dict(counts),
                      "offline_sample_gold_mean": round(mean(all_scores), 4),
                      "chosen_gold_mean": round(mean([r["score_chosen"] for r in rows]), 4),
                      "rejected_gold_mean": round(mean([r["score_rejected"] for r in rows]), 4),
                      "seconds": round(time.perf_counter() - t0, 1), "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
