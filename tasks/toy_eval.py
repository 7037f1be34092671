"""Before/after gold evaluation on held-out prompts of the toy alignment task.

``eval.task: tasks.toy_eval:evaluate_run``: `tasks.gold_eval`'s engine (vLLM greedy + sampled,
before cached, after from the trained weights in memory) on prompts
[``eval.first_prompt``, ``eval.first_prompt + eval.num_prompts``) of the toy task's fixed
held-out pool (`toy_alignment.heldout_pool`, which every training split of the evidence study
excludes), graded by `toy_alignment.gold_score` ("all met" = a perfect answer, gold 1.0).
``eval.seed`` seeds the sampling only: the pool is fixed, so training prompts stay disjoint.

    python -m tasks.toy_eval [--model runs/evidence_toy/task/sft] [--after runs/x/hf_final]

(the SFT policy that ``benchmarks/evidence_study.py --task toy`` builds).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tasks import gold_eval as G
from tasks.gold_eval import EvalSettings
from tasks.toy_alignment import HELDOUT_POOL, Prompt, gold_score, heldout_pool


def heldout_prompts(s: EvalSettings) -> list[Prompt]:
    end = s.first_prompt + s.num_prompts
    if end > HELDOUT_POOL:
        raise ValueError(f"eval.first_prompt + eval.num_prompts = {end} exceeds the toy task's held-out pool "
                         f"of {HELDOUT_POOL} prompts (tasks/toy_alignment.py HELDOUT_POOL): ask for fewer")
    return heldout_pool()[s.first_prompt:end]


def _grade(p: Prompt, text: str) -> tuple[float, bool]:
    g = gold_score(p, text)
    return g, g >= 1.0


TASK = G.GoldTask(
    cache_name="toy_eval", title="toy alignment task",
    gold_doc="gold = tasks/toy_alignment.py gold_score (items present, in order, `done`, -0.5 per extra "
             "word; 1.0 = the ideal answer); prompts from a pool no training split uses",
    heldout=heldout_prompts, grade=_grade,
    prompt_json=lambda p: {"key": p.text, "prompt": p.text, "direction": p.direction, "items": list(p.items)},
    label=lambda p: f"{p['direction']}, {len(p['items'])} items")


def evaluate_run(cfg: Any, ctx: Any, policy: Any, model_dir: Path, run_dir: Path,
                 step: int | None = None) -> dict | None:
    """The ``eval.task`` function: `gold_eval.evaluate_run` on the toy task."""
    return G.evaluate_run(TASK, cfg, ctx, policy, model_dir, run_dir, step)


def main(argv: list[str] | None = None) -> int:
    return G.main(TASK, argv, prog="python -m tasks.toy_eval", description=__doc__.split("\n\n")[0],
                  model="runs/evidence_toy/task/sft", num_prompts=200, max_new_tokens=24)


if __name__ == "__main__":
    sys.exit(main())
