"""MetaAPO's training step vs the plain padded layout and vs the DPO step, side by side.

Three variants of one optimiser step through the real path (`metaapo_nemo.run` build, the
algorithm's `StepWork`, `trainer.loop.Trainer.train_step`: megatron schedule + optimiser):

- ``metaapo``: MetaAPO rows (offline + online pair per prompt) in the configured row layout
  (default: bucket + shared prompt per pair); reference values cached by the round's margin
  pass (offline) and its one pass over the online pairs (timed, and reported spread over the
  round's steps as ``*_incl_round_reference``);
- ``metaapo_pad``: the same rows in the plain padded layout (train.batching=pad,
  share_prompt=false: what MetaAPO ran before its rows joined the common layouts);
- ``metaapo_fixed_rows``: ``metaapo`` with a row kept for every absent online pair
  (`RowLayout.fixed_rows`, what PP needs and what every layout did before 2026-12-03): a
  prompt without an online pair then costs a whole padded row more (not in packed layouts);
- ``metaapo_h100`` / ``dpo_h100``: the H100 recipes' rows (`H100_ROWS`: packed as THD
  `PackedSeqParams`, the Transformer Engine spec's packing, which the CPU runs through the
  SDPA core's variable-length attention; no shared prompt: TE's attention cannot express it);
  ``metaapo_h100_bucket``: what the H100 recipes ran before (length buckets, no sharing);
- ``dpo``: the offline DPO step on the same offline pairs (default layout).

Online pairs are synthetic (other prompts' responses stand in for samples) for
``--online-fraction`` of the prompts, so no engine or reward model runs: the step itself is
measured. Offline reference values come from the round's margin pass (MetaAPO) or a
precomputed cache (DPO), as in training. Each variant runs in its own process, the variants
alternate for ``--repeats`` rounds, and the median tokens/s (non-padding tokens of every
sequence through the policy per second of step time) is reported with the ratios.

    python benchmarks/metaapo_step.py                      # tiny default, prints one JSON line
    python benchmarks/metaapo_step.py --record             # and appends it to benchmarks/results/
    python benchmarks/metaapo_step.py model.tiny.hidden_size=256 model.tiny.num_layers=4

Targets: metaapo >= 0.9 x dpo tokens/s (issue 15); metaapo_h100 >= 0.9 x dpo (issue 34: the
H100 layout on the CPU proxy; 0.64x with buckets). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "metaapo_step.jsonl"
# The H100 recipes' rows on the CPU proxy: packed as THD PackedSeqParams (what the Transformer
# Engine spec runs; here the SDPA core's variable-length attention), no shared prompt.
H100_ROWS = ["train.batching=pack", "train.pack_format=thd", "train.share_prompt=false"]
VARIANTS = {  # name: (method, overrides, RowLayout.fixed_rows forced on)
    "metaapo": ("metaapo", [], False),
    "metaapo_fixed_rows": ("metaapo", [], True),
    "metaapo_pad": ("metaapo", ["train.batching=pad", "train.share_prompt=false"], False),
    "metaapo_h100": ("metaapo", H100_ROWS, False),
    "metaapo_h100_bucket": ("metaapo", ["train.batching=bucket", "train.share_prompt=false"], False),
    "dpo": ("dpo", [], False),
    "dpo_h100": ("dpo", H100_ROWS, False),
}


def _items(pairs: list, fraction: float) -> list:
    """Round items: every k-th prompt gets an online pair made of another prompt's responses."""
    from metaapo_nemo.algorithms.rounds import OnlinePair, RoundItem

    n = len(pairs)
    online = set(range(0, n, max(1, round(1 / fraction)))) if fraction > 0 else set()
    return [RoundItem(p, OnlinePair(pairs[(i + 1) % n].chosen_ids, pairs[(i + 1) % n].rejected_ids, 1.0, 0.0)
                      if i in online else None) for i, p in enumerate(pairs)]


def measure(variant: str, steps: int, fraction: float, overrides: list[str], threads: int = 1) -> dict:
    """One process: build the run, prepare the data, time `steps` optimiser steps (+1 warm-up)."""
    import torch

    torch.set_num_threads(threads)
    from metaapo_nemo import run as R
    from metaapo_nemo.algorithms.online import with_online_reference
    from metaapo_nemo.algorithms.rounds import offline_margins
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.trainer.batching import to_microbatches
    from metaapo_nemo.trainer.callbacks import TrainState
    from metaapo_nemo.trainer.loop import Trainer

    method, extra, fixed_rows = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        meta = ["metaapo.sampling=none"] if method == "metaapo" else []
        cfg = load_config(None, [f"run.output_dir={tmp}", "run.name=bench", "train.progress_bar=off",
                                 "train.save_final_hf=false", "checkpoint.save_at_end=false",
                                 "checkpoint.resume=never", *meta, *extra, *overrides], method=method)
        run = R.build(cfg, method)
        if fixed_rows:
            run.layout = dataclasses.replace(run.layout, fixed_rows=True)
        run.logger.enabled = False
        G = run.plan.global_batch
        pairs = run.pairs[: G * (steps + 1)]
        algo = run.algorithm
        round_reference_s = 0.0
        if method == "metaapo":
            items = _items(pairs, fraction)
            mbs = to_microbatches(pairs, run.plan.micro_batch, run.pad_id, run.ctx.device, run.layout)
            offline_margins(run.policy, run.reference, run.loss, mbs, run.ctx, ref_cache=run.ref_cache)
            t0 = time.perf_counter()  # the round's one reference pass over its online pairs
            items = with_online_reference(run.reference, items, run.ctx, run.plan.micro_batch, run.pad_id,
                                          run.layout)
            round_reference_s = time.perf_counter() - t0
            algo.round.items, algo._order = items, items  # step order = round order
            next_work = lambda: algo._step(algo._order)  # noqa: E731
        else:
            algo.run.pairs = pairs
            algo.fill_reference(pairs)  # cached, as MetaAPO's margin pass caches its offline pairs
            st0 = TrainState(total_steps=steps + 1)
            next_work = lambda: algo.next_step(st0)  # noqa: E731
        trainer = Trainer(algo, run.policy, run.ctx, run.guard, run.callbacks, steps + 1)
        st = TrainState(total_steps=steps + 1)
        rates, tokens = [], []
        for k in range(steps + 1):
            work = next_work()
            trainer.train_step(st, work, save=lambda: None)
            if k:  # the first step warms up
                rates.append(st.metrics["tokens_per_s"])
                tokens.append(sum(mb.extras["tokens"] for mb in work.microbatches))
        run.logger.close()
        from metaapo_nemo.parallel import state

        state.destroy()
        per_step_ref = round_reference_s / (steps + 1)  # the round's pass, spread over its steps
        with_ref = [t / (t / r + per_step_ref) for t, r in zip(tokens, rates)]
        return {"tokens_per_s": statistics.median(rates), "tokens_per_step": statistics.mean(tokens),
                "tokens_per_s_incl_round_reference": statistics.median(with_ref),
                "round_reference_s_per_step": per_step_ref, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant and repeat")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of alternating variants")
    ap.add_argument("--online-fraction", type=float, default=0.6, help="prompts with an online pair")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1: immune to the OpenMP oversubscription cliff, "
                         "25x measured, when anything else runs on a 2-core machine)")
    ap.add_argument("--record", action="store_true", help=f"append the result to {RESULTS.relative_to(REPO)}")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="a.b=c config overrides (model, batch, layout)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.steps, args.online_fraction, args.overrides, args.threads)))
        return 0
    per: dict[str, list[float]] = {v: [] for v in VARIANTS}
    tokens: dict[str, float] = {}
    incl: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps), "--threads",
                   str(args.threads),
                   "--online-fraction", str(args.online_fraction), *args.overrides]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            per[variant].append(res["tokens_per_s"])
            tokens[variant] = res["tokens_per_step"]
            incl[variant].append(res["tokens_per_s_incl_round_reference"])
    med = {v: statistics.median(x) for v, x in per.items()}
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} x{os.cpu_count()} cpu",
        "load_avg_1m": os.getloadavg()[0], "steps": args.steps, "repeats": args.repeats,
        "online_fraction": args.online_fraction, "overrides": args.overrides, "threads": args.threads,
        "tokens_per_s": {v: round(x, 1) for v, x in med.items()},
        "tokens_per_step": tokens,
        "ratio_metaapo_vs_pad": round(med["metaapo"] / med["metaapo_pad"], 3),
        "ratio_metaapo_vs_fixed_rows": round(med["metaapo"] / med["metaapo_fixed_rows"], 3),
        "ratio_metaapo_vs_dpo": round(med["metaapo"] / med["dpo"], 3),
        # the H100 recipes' layout (THD-packed) vs today's GPU fallback (buckets, no sharing)
        "ratio_metaapo_h100_vs_dpo": round(med["metaapo_h100"] / med["dpo"], 3),
        "ratio_metaapo_h100_vs_dpo_h100": round(med["metaapo_h100"] / med["dpo_h100"], 3),
        "ratio_metaapo_h100_bucket_vs_dpo": round(med["metaapo_h100_bucket"] / med["dpo"], 3),
        # the same with the round's online-pair reference pass spread over the round's steps
        # (DPO's reference is cached: nothing to add)
        "tokens_per_s_incl_round_reference": {v: round(statistics.median(x), 1) for v, x in incl.items()},
        "ratio_metaapo_vs_dpo_incl_round_reference": round(statistics.median(incl["metaapo"]) / med["dpo"], 3),
        "target_metaapo_vs_dpo": 0.9,
    }
    print(json.dumps(result))
    if args.record:
        with open(RESULTS, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
