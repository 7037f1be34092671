"""Models of the toy alignment task: tokenizer, SFT policy, learned reward model, evaluation.

Plain PyTorch / transformers code (the preference training itself goes through the real
recipes). Everything is built locally and saved in HF format, so the recipes load the SFT
policy (``model.path``) and the reward model (``reward.path``) through the same import
path as real checkpoints.

- `build_base`: a tokenizer trained on the task's words (each word ~ one token) and a
  random tiny Llama.
- `train_sft`: next-token loss on the response tokens of mixed-quality demonstrations.
- `train_reward_model`: a tiny ``LlamaForSequenceClassification`` trained with the
  Bradley-Terry loss on gold-labelled pairs; it sees texts through `HFRewardModel.render`
  (the RM's chat template), exactly as the trainer will score them.
- `generate` / `evaluate_policy`: HF ``generate`` on held-out prompts, gold reward of greedy
  and sampled answers, RM win rate against the SFT policy's greedy answers.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.toy_alignment import (Prompt, demonstrate, gold_score, heldout_pool, make_prompts,
                                 preference_rows, tokenizer_corpus)
from tasks.toy_prefs import write_jsonl

MAX_NEW_TOKENS = 24
# One intra-op thread: on a small shared CPU, 2 threads of tiny matmuls spend most of their
# time waiting for each other (measured 4-10x slower per step under load).
THREADS = 1
POLICY_SPEC = dict(arch="llama", vocab_size=640, hidden_size=128, num_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=256, max_position_embeddings=256, seed=0)
RM_SPEC = dict(arch="llama", vocab_size=640, hidden_size=64, num_layers=2, num_attention_heads=2,
               num_key_value_heads=1, intermediate_size=128, max_position_embeddings=256, seed=1)


def build_base(out_dir: Path, spec: dict | None = None) -> Path:
    """A random tiny Llama with the task tokenizer (HF format) in ``out_dir``."""
    from metaapo_nemo.models.tiny import TinyModelSpec, build_tiny_checkpoint

    return build_tiny_checkpoint(TinyModelSpec(**(spec or POLICY_SPEC)), out_dir, corpus=tokenizer_corpus())


def encode(tokenizer, messages: list[dict], response: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, response ids ending with EOS)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if response is None:
        return p_ids, []
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    f_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids, "chat template: the prompt is not a token prefix"
    return p_ids, f_ids[len(p_ids):]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (n - len(r)) for r in rows])


def train_sft(base_dir: Path, out_dir: Path, prompts: Sequence[Prompt], *, epochs: int = 4,
              lr: float = 2e-3, batch: int = 64, seed: int = 0, log=print) -> Path:
    """Fine-tunes the base model on one `demonstrate(..., "sft")` answer per prompt and epoch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = random.Random(seed)
    steps = epochs * math.ceil(len(prompts) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    step = 0
    for epoch in range(epochs):
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            ids, labels = [], []
            for i in order[start:start + batch]:
                p = prompts[i]
                p_ids, r_ids = encode(tok, p.messages(), demonstrate(p, "sft", rng))
                ids.append(p_ids + r_ids)
                labels.append([-100] * len(p_ids) + r_ids)
            x, y = _pad(ids, tok.pad_token_id), _pad(labels, -100)
            out = model(input_ids=x, attention_mask=(y != -100) | (x != tok.pad_token_id), labels=y)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"sft step {step}/{steps} loss {out.loss.item():.4f}")
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def train_reward_model(out_dir: Path, pairs: Sequence[tuple[Prompt, str, str]], *, epochs: int = 3,
                       lr: float = 1e-3, batch: int = 32, seed: int = 0, log=print) -> Path:
    """Bradley-Terry training of a tiny sequence-classification RM on (prompt, chosen, rejected)."""
    from transformers import AutoModelForSequenceClassification

    from metaapo_nemo.models.tiny import TinyModelSpec, _model_config
    from metaapo_nemo.models.tokenizer import build_tokenizer

    spec = TinyModelSpec(**RM_SPEC)
    tok = build_tokenizer(spec.vocab_size, tokenizer_corpus())
    config = _model_config(spec, tok)
    config.num_labels = 1
    torch.set_num_threads(THREADS)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    tok.padding_side = "right"

    def rewards(texts: list[str]) -> torch.Tensor:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return model(**enc).logits[:, 0]

    def render(p: Prompt, r: str) -> str:
        return tok.apply_chat_template(p.messages() + [{"role": "assistant", "content": r}], tokenize=False)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    steps = epochs * math.ceil(len(pairs) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    step = 0
    for _ in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            chunk = [pairs[i] for i in order[start:start + batch]]
            r = rewards([render(p, c) for p, c, _ in chunk] + [render(p, rj) for p, _, rj in chunk])
            loss = -F.logsigmoid(r[: len(chunk)] - r[len(chunk):]).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0 or step == steps:
                log(f"rm step {step}/{steps} loss {loss.item():.4f}")
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return Path(out_dir)


def rm_pair_accuracy(rm, pairs: Sequence[tuple[Prompt, str, str]]) -> float:
    """Fraction of pairs the RM orders like the gold score (ties count 1/2)."""
    msgs = [p.messages() for p, _, _ in pairs]
    sc = rm.score(msgs, [c for _, c, _ in pairs])
    sr = rm.score(msgs, [r for _, _, r in pairs])
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sc, sr)) / len(pairs)


def load_policy(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tok


@torch.no_grad()
def generate(model, tok, prompts: Sequence[Prompt], *, sample: bool, seed: int = 0, batch: int = 256,
             max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """One answer per prompt: greedy, or sampled at temperature 1 / top_p 1 (seeded)."""
    torch.manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch):
        rows = [encode(tok, p.messages())[0] for p in prompts[start:start + batch]]
        n = max(len(r) for r in rows)
        ids = torch.tensor([[tok.pad_token_id] * (n - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
        kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(do_sample=False)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
        out += tok.batch_decode(gen[:, n:], skip_special_tokens=True)
    return out


def evaluate_policy(model_dir: Path, prompts: Sequence[Prompt], *, seed: int = 0, samples: int = 2,
                    rm=None, sft_greedy: Sequence[str] | None = None) -> dict:
    """Gold reward of greedy and sampled answers; RM win rate of greedy answers vs SFT's."""
    torch.set_num_threads(THREADS)
    model, tok = load_policy(model_dir)
    greedy = generate(model, tok, prompts, sample=False)
    sampled = [t for k in range(samples) for t in generate(model, tok, prompts, sample=True, seed=seed * 1000 + k)]
    res = {
        "gold_greedy": sum(gold_score(p, t) for p, t in zip(prompts, greedy)) / len(prompts),
        "gold_sampled": sum(gold_score(p, t) for p, t in zip(list(prompts) * samples, sampled)) / len(sampled),
        "perfect_greedy": sum(gold_score(p, t) == 1.0 for p, t in zip(prompts, greedy)) / len(prompts),
        "greedy_len_words": sum(len(t.split()) for t in greedy) / len(greedy),
    }
    if rm is not None and sft_greedy is not None:
        msgs = [p.messages() for p in prompts]
        a, b = rm.score(msgs, greedy), rm.score(msgs, list(sft_greedy))
        res["rm_winrate_vs_sft"] = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)
    return res | {"greedy_texts": greedy}


def build_study_task(out_dir: Path, *, sft_prompts: int = 6000, sft_epochs: int = 12, sft_lr: float = 3e-3,
                     train_prompts: int = 384, profiles: Sequence[str] = ("sft", "behaviour"),
                     log=print) -> dict:
    """The evidence study's toy task in ``out_dir`` (cached: a finished ``task.json`` is reused
    when its settings match; a change rebuilds): ``sft/`` (the SFT policy, HF format) and
    ``offline_pairs.jsonl`` (one gold-labelled pair per training prompt, written by the
    demonstrator ``profiles`` in turn). No prompt of either is in the held-out pool
    (`toy_alignment.heldout_pool`) the evaluation reads.
    """
    out_dir = Path(out_dir)
    settings = {"sft_prompts": sft_prompts, "sft_epochs": sft_epochs, "sft_lr": sft_lr,
                "train_prompts": train_prompts, "profiles": list(profiles), "policy": POLICY_SPEC}
    meta_path = out_dir / "task.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["settings"] == settings:
            return meta
        log(f"{meta_path}: built with other settings; rebuilding")
    t0 = time.perf_counter()
    used = {p.text for p in heldout_pool()}
    sft_p = make_prompts(sft_prompts, 10, exclude=used)
    used |= {p.text for p in sft_p}
    train_p = make_prompts(train_prompts, 30, exclude=used)
    sft_settings = {k: settings[k] for k in ("sft_prompts", "sft_epochs", "sft_lr", "policy")}
    sft_done = out_dir / "sft" / "settings.json"
    if not (sft_done.is_file() and json.loads(sft_done.read_text()) == sft_settings):
        log("building the tokenizer + base model")
        build_base(out_dir / "base")
        log(f"SFT on {len(sft_p)} prompts x {sft_epochs} epochs of 'sft'-profile demonstrations")
        train_sft(out_dir / "base", out_dir / "sft", sft_p, epochs=sft_epochs, lr=sft_lr, log=log)
        sft_done.write_text(json.dumps(sft_settings))
    rows = []
    for i, profile in enumerate(profiles):  # prompt j is written by profiles[j % len(profiles)]
        part = preference_rows(train_p[i::len(profiles)], profile, seed=31 + i)
        rows += [r | {"profile": profile} for r in part]
    order = {p.text: j for j, p in enumerate(train_p)}
    rows.sort(key=lambda r: order[r["prompt"]])
    write_jsonl(rows, out_dir / "offline_pairs.jsonl")
    meta = {"settings": settings, "offline_pairs": len(rows),
            "offline_gold_chosen_mean": sum(r["score_chosen"] for r in rows) / len(rows),
            "offline_gold_rejected_mean": sum(r["score_rejected"] for r in rows) / len(rows),
            "build_s": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"toy task ready in {meta['build_s']:.0f} s: {len(rows)} offline pairs, gold chosen "
        f"{meta['offline_gold_chosen_mean']:.3f} vs rejected {meta['offline_gold_rejected_mean']:.3f}")
    return meta
