"""Gold-score evaluation on held-out IFEval-task prompts, before and after training.

For a policy: greedy and sampled generations on ``eval.num_prompts`` held-out prompts
(templates and topics never seen in training), each scored by the IFEval checkers
(`ifeval_task.gold_score`: fraction of the prompt's constraints met, strict). Reported: the
mean gold score and the fraction of responses with every constraint met. The engine (before
from the initial checkpoint, cached; after from the trained weights pushed in memory;
``eval.json`` and a ``summary.md`` section) is `tasks.gold_eval`'s, shared with the toy task.

In a recipe: ``eval.task: tasks.ifeval_eval:evaluate_run`` (see `metaapo_nemo.evals`).
Stand-alone, for any checkpoint:

    python -m tasks.ifeval_eval --model .cache/smollm2/hf [--after runs/x/hf_final]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks import gold_eval as G
from tasks.gold_eval import EvalSettings, GenerateFn, cache_key, headline, prompt_ids  # noqa: F401 (API)
from tasks.ifeval_task import TaskPrompt, gold_details, make_prompts


def heldout_prompts(s: EvalSettings) -> list[TaskPrompt]:
    """Held-out prompts [first_prompt, first_prompt + num_prompts): disjoint ranges of one seed's
    list are disjoint prompt sets (prompt i does not depend on the list's length)."""
    return make_prompts("heldout", s.first_prompt + s.num_prompts, s.seed)[s.first_prompt:]


def _grade(p: TaskPrompt, text: str) -> tuple[float, bool]:
    passed = gold_details(p.constraints, text, p.text)
    return sum(passed) / len(passed), all(passed)


TASK = G.GoldTask(
    cache_name="ifeval_eval", title="IFEval-style constraints",
    gold_doc="gold = fraction of constraints met (if-verifiable IFEval checkers, strict); templates and "
             "topics unseen in training",
    heldout=heldout_prompts, grade=_grade, prompt_json=lambda p: p.to_json(),
    label=lambda p: ", ".join(p["instruction_id_list"]))


def evaluate(generate: GenerateFn, ids: Sequence[Sequence[int]], prompts: Sequence[TaskPrompt],
             s: EvalSettings) -> dict[str, Any]:
    """Greedy + sampled gold scores of one policy (whatever `generate` samples from)."""
    return G.evaluate(TASK, generate, ids, prompts, s)


def evaluate_run(cfg: Any, ctx: Any, policy: Any, model_dir: Path, run_dir: Path,
                 step: int | None = None) -> dict | None:
    """The ``eval.task`` function: `gold_eval.evaluate_run` on the IFEval task."""
    return G.evaluate_run(TASK, cfg, ctx, policy, model_dir, run_dir, step)


def markdown(result: dict, annotation_ratio: float | None = None) -> str:
    return G.markdown(TASK, result, annotation_ratio)


def append_summary(run_dir: Path, result: dict) -> Path:
    return G.append_summary(TASK, run_dir, result)


def evaluate_checkpoint(model_dir: str, s: EvalSettings, after_dir: str | None = None) -> dict:
    """Stand-alone: one vLLM engine (no training job), `model_dir` then optionally `after_dir`."""
    return G.evaluate_checkpoint(TASK, model_dir, s, after_dir)


def main(argv: list[str] | None = None) -> int:
    return G.main(TASK, argv, prog="python -m tasks.ifeval_eval", description=__doc__.split("\n\n")[0],
                  model=".cache/smollm2/hf")


if __name__ == "__main__":
    sys.exit(main())
