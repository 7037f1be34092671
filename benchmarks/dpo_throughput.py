"""Tiny-model CPU DPO throughput: the baseline every later optimisation is measured against.

Runs the real training path (metaapo_nemo.run, what recipes/dpo.py runs: Megatron-Core policy + frozen reference, megatron
schedule, megatron optimiser) on the tiny CPU default for a few steps and prints ONE line
of JSON: median pairs/s and tokens/s over the steps after warm-up, with the machine facts.

    python benchmarks/dpo_throughput.py                    # tiny default, 10 steps
    python benchmarks/dpo_throughput.py --steps 20 train.micro_batch_size=4

Tokens count every non-padding token that goes through the policy (prompt + response,
both rows of a pair); the reference forward is included in the step time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps (first one is warm-up)")
    parser.add_argument("--config", default=None, help="recipe YAML (default: conf/tiny_cpu_dpo.yaml)")
    parser.add_argument("overrides", nargs="*", help="a.b=c config overrides")
    args = parser.parse_args(argv)

    import torch

    from metaapo_nemo.config.loader import load_config

    from metaapo_nemo import run as R
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [
            f"run.output_dir={tmp}", "run.name=bench", "train.progress_bar=off",
            "train.save_final_hf=false", f"train.max_steps={args.steps}", "train.epochs=100",
            "checkpoint.save_at_end=false", "checkpoint.resume=never",
            *args.overrides,
        ], method="dpo")
        c = R.build(cfg, "dpo")
        c.logger.enabled = False  # timing only; nothing printed per step
        times, pairs, tokens = [], [], []

        class _Collect:
            def on_step_end(self, st):
                times.append(st.metrics["step_time"])
                pairs.append(st.metrics["pairs_per_s"])
                tokens.append(st.metrics["tokens_per_s"])

        c.callbacks.callbacks.append(_Collect())
        R.fit(c)
        from metaapo_nemo.parallel import state

        state.destroy()
    timed = slice(1, None) if len(times) > 1 else slice(None)
    record = {
        "benchmark": "dpo_throughput",
        "model": f"tiny-{cfg.model.tiny.arch}" if cfg.model.tiny else cfg.model.path,
        "params": c.policy.arch.num_parameters,
        "global_batch": cfg.train.global_batch_size,
        "micro_batch": cfg.train.micro_batch_size,
        "steps_timed": len(times[timed]),
        "pairs_per_s": round(statistics.median(pairs[timed]), 3),
        "tokens_per_s": round(statistics.median(tokens[timed]), 1),
        "step_time_s": round(statistics.median(times[timed]), 4),
        "step_time_range_s": [round(min(times[timed]), 4), round(max(times[timed]), 4)],
        "torch_threads": torch.get_num_threads(),
        "dtype": cfg.model.dtype,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([str(Path(sys.argv[0]).relative_to(REPO)) if Path(sys.argv[0]).is_absolute() else sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
