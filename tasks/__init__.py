"""Demo, test and benchmark tasks: toy data, synthetic pairs, tasks with a gold reward.

Not part of the installed package (`metaapo_nemo`): the library never imports them. A run
reaches what they offer by name in its config (resolved by `metaapo_nemo.named`), e.g.
``reward.callable: tasks.toy_rules:score`` or ``eval.task: tasks.ifeval_eval:evaluate_run``;
tests and benchmarks import them from the repository root.

- `toy_prefs`: the toy preference rows of ``metaapo_nemo/data/samples/toy_prefs.jsonl``;
  `toy_rules`: a rule reward for them.
- `synthetic`: token-level pairs with chat-like lengths (batching tests, benchmarks).
- `toy_alignment` (+ `toy_alignment_models`): "list these items forward / in reverse" with a
  gold reward (benchmarks/toy_alignment).
- `ifeval_task`, `ifeval_pairs`, `ifeval_eval`: IFEval-style prompts scored by the IFEval
  checkers, their offline pairs, and the before/after evaluation (the SmolLM2 recipes).
- `gold_eval`: the before/after evaluation engine of a task with a gold score (vLLM, greedy and
  sampled), behind `ifeval_eval` and `toy_eval` (the toy task's held-out pool, the evidence study).
"""
