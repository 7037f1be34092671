"""Logits parity of our Megatron-Core model with HF transformers on real chat prompts.

    torchrun --standalone --nproc-per-node N tests/workers/parity_worker.py SPEC.json

SPEC.json: ``{"hf_dir", "tp", "pp", "out", "export_dir", "prompts": n}`` and optionally ``"ep"``
(expert parallel) and ``"sequence_parallel"``. Every rank builds
its shards of the checkpoint (`MegatronLM`, frozen), runs one forward-only pass of the chat
prompts through megatron's schedule (TP logits all-gathered on the last stage, then
broadcast over the pipeline), exports the model back to HF (`export_hf`), and rank 0
compares both with HF (logits and log-probs; exported tensors bit for bit) and writes the
measurements to ``out``.

The helpers are shared with the in-process (TP=1) tests in tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# Everyday chat requests (short factual, arithmetic, lists, rewriting, code): the greedy
# continuations of a real instruct model are long and varied.
QUESTIONS = (
    "What is the capital of France?",
    "What is 17 + 25?",
    "List three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for 'happy'.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Write a haiku about autumn leaves.",
    "What is the largest planet in the solar system?",
    "Explain in one sentence what photosynthesis is.",
    "Name two programming languages.",
    "Write a Python function that returns the square of a number.",
    "Who wrote 'Romeo and Juliet'?",
    "Suggest a name for a pet goldfish.",
    "What is 9 times 8?",
)


def chat_ids(tokenizer, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of one-turn chats with the generation prompt (the model's own template)."""
    out = []
    for q in questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@torch.no_grad()
def megatron_logits(lm, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Full-vocabulary logits [L_i, V] of each prompt, on every rank (any TP/PP layout).

    One forward-only pass of the right-padded rows through megatron's schedule (the causal
    mask keeps each row's real positions independent of the padding after it).
    """
    from metaapo_nemo.models.decode import _forward

    ctx, vocab = lm.ctx, lm.arch.vocab_size
    n, t = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, t), lm.pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)

    def consume(logits_NTv: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = [logits_NTv.float().contiguous()]
        if ctx.dims.tp > 1:
            parts = [torch.empty_like(parts[0]) for _ in range(ctx.dims.tp)]
            dist.all_gather(parts, logits_NTv.float().contiguous(), group=ctx.tp_group)
        return {"logits": torch.cat(parts, dim=-1)[..., :vocab].contiguous()}

    full = _forward(lm, ids, consume, {"logits": ((n, t, vocab), torch.float32)})["logits"]
    return [full[i, : len(p)].clone() for i, p in enumerate(prompts)]


@torch.no_grad()
def hf_logits(model, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """HF logits [L_i, V] of each prompt, one unpadded forward per prompt."""
    return [model(torch.tensor([list(p)])).logits[0].float() for p in prompts]


def compare_logits(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> dict:
    """Max |logit| and |log-prob| differences, argmax agreement, over every position."""
    a, b = torch.cat(ours), torch.cat(ref)
    lp = (torch.log_softmax(a.double(), -1) - torch.log_softmax(b.double(), -1)).abs()
    return {
        "positions": int(a.shape[0]),
        "max_abs_logit_diff": float((a - b).abs().max()),
        "mean_abs_logit_diff": float((a - b).abs().mean()),
        "max_abs_logprob_diff": float(lp.max()),
        "max_abs_logit": float(b.abs().max()),
        "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
    }


def compare_exports(src_dir: Path, out_dir: Path) -> dict:
    """Exported tensors vs the source checkpoint's: same names, dtypes and bits."""
    from safetensors.torch import load_file

    src = load_file(str(src_dir / "model.safetensors"))
    dst = load_file(str(out_dir / "model.safetensors"))
    differ = sorted(
        k
        for k in src.keys() & dst.keys()
        if src[k].dtype != dst[k].dtype or not torch.equal(src[k], dst[k])
    )
    return {
        "export_tensors": len(dst),
        "export_missing": sorted(src.keys() - dst.keys()),
        "export_extra": sorted(dst.keys() - src.keys()),
        "export_differ": differ,
        "export_bit_exact": not differ and src.keys() == dst.keys(),
    }


def run(spec: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.parallel import state

    hf_dir = Path(spec["hf_dir"])
    ctx = state.initialize(tp=spec["tp"], pp=spec["pp"], ep=spec.get("ep", 1))
    try:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        prompts = chat_ids(tok, QUESTIONS[: spec.get("prompts", len(QUESTIONS))])
        t0 = time.perf_counter()
        opts = BuildOptions(sequence_parallel=spec.get("sequence_parallel", False))
        lm = MegatronLM(load_arch(hf_dir), ctx, hf_dir, opts, pad_id=tok.pad_token_id)
        ours = megatron_logits(lm, prompts)
        forward_s = time.perf_counter() - t0
        out_dir = Path(spec["export_dir"])
        export_hf(lm.modules(), lm.arch, ctx, hf_dir, out_dir)
        if ctx.is_main:
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            result = {
                "tp": spec["tp"],
                "pp": spec["pp"],
                "ep": spec.get("ep", 1),
                "prompts": len(prompts),
                "build_and_forward_s": round(forward_s, 2),
                **compare_logits(ours, hf_logits(hf, prompts)),
                **compare_exports(hf_dir, out_dir),
            }
            shutil.rmtree(out_dir, ignore_errors=True)
            Path(spec["out"]).write_text(json.dumps(result, indent=1))
        dist.barrier()
    finally:
        state.destroy()


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()))
