"""Evaluation answers with vLLM from any HF checkpoint, in AlpacaEval and MT-Bench formats.

The formats, seeding and error handling are described in `metaapo_nemo.generate`.

    CPU:  python recipes/generate.py --model runs/dpo/hf_final --format alpaca_eval \\
              --prompts metaapo_nemo/data/samples/eval_alpaca.json --out runs/eval/model_outputs.json
          python recipes/generate.py --model .cache/smollm2/hf --format mt_bench \\
              --prompts metaapo_nemo/data/samples/eval_mtbench.jsonl --out runs/eval/answers.jsonl
    GPU:  the same command with the container's vllm on one GPU (add --dtype bfloat16).
"""

import sys

from metaapo_nemo.generate import main

if __name__ == "__main__":
    sys.exit(main())
