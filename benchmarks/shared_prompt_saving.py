"""What sharing the prompt saves, against prompt length (issue 10, item 3).

For each prompt length P (responses fixed), our recipe trains one pass with and without
`train.share_prompt` (same bucketing, SDPA attention, per-step reference), alternating in
subprocesses as `dpo_step_vs_trl.py` does, and prints one JSON line per P: the share of
row tokens the shared layout removes, (P - 1) / (2P + C + R), and the measured pass-time
saving (median over repeats).

    python benchmarks/shared_prompt_saving.py                      # tiny llama
    python benchmarks/shared_prompt_saving.py --prompts 32 128 --response 128 --model smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dpo_step_vs_trl as bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--prompts", type=int, nargs="+", default=[16, 64, 256, 512])
    p.add_argument("--response", type=int, default=128)
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(bench.RESULTS.with_name("shared_prompt_saving.jsonl")))
    args = p.parse_args(argv)
    key, model_dir = bench.model_source(args.model)
    dflt = bench.DEFAULTS[key]
    pairs = args.pairs or dflt["pairs"]
    common = dict(model=key, model_dir=model_dir, pairs=pairs, global_batch=dflt["global_batch"],
                  micro_batch=dflt["micro_batch"], threads=args.threads, seed=0, beta=0.1,
                  lr=5e-4 if key == "tiny" else 5e-7, framework="ours", reference="per_step",
                  precompute=False, batching="bucket", attention="sdpa")
    lines = []
    for prompt in args.prompts:
        data = dict(kind="fixed", prompt=dflt["prompt"], response=dflt["response"],
                    fixed=(prompt, args.response), **bench.token_range(model_dir))
        job = dict(common, data=data, max_length=prompt + args.response)
        times = {False: [], True: []}
        for r in range(args.repeats):
            for share in ((False, True) if r % 2 == 0 else (True, False)):
                res = bench.spawn(dict(job, name=f"share={share}", share_prompt=share))
                times[share].append(res["pass_s"])
        plain, shared = statistics.median(times[False]), statistics.median(times[True])
        row_tokens = 2 * prompt + 2 * args.response
        line = {"benchmark": "shared_prompt_saving", "model": args.model, "prompt": prompt,
                "response": args.response, "pairs": pairs, "repeats": args.repeats,
                "token_saving": round((prompt - 1) / row_tokens, 3),
                "time_saving": round(1 - shared / plain, 3),
                "pass_s_plain": round(plain, 3), "pass_s_shared": round(shared, 3),
                "threads": args.threads, "machine": bench.machine(),
                "date": datetime.date.today().isoformat(),
                "command": " ".join(["python benchmarks/shared_prompt_saving.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
        print(json.dumps(line), flush=True)
        lines.append(line)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
