"""Tiny random Bradley-Terry reward models, built locally (never downloaded).

The same shapes and tokenizer as the tiny policies (`metaapo_nemo.models.tiny`), with a
scalar sequence-classification head (``LlamaForSequenceClassification`` /
``Qwen2ForSequenceClassification``, ``num_labels=1``), saved with ``save_pretrained`` so
tests load them through the same ``from_pretrained`` path as a real RM. Scores of a random
RM mean nothing; they are deterministic, which is what the tests need.

CLI::

    python -m metaapo_nemo.reward.tiny_rm --cache-dir .cache/tiny_models [--arch qwen2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from metaapo_nemo.models.tiny import FORMAT_VERSION, TinyModelSpec, _model_config
from metaapo_nemo.models.tokenizer import build_tokenizer

# Bump when the same spec would build a different RM (independent of the policy format).
RM_FORMAT_VERSION = 1


def build_tiny_reward_model(spec: TinyModelSpec, out_dir: str | Path) -> Path:
    """Trains the tokenizer, random-inits a scalar-head model, saves both in HF format.

    The weights depend only on `spec` (global RNG forked and restored).
    """
    from transformers import AutoModelForSequenceClassification

    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    config = _model_config(spec, tokenizer)  # the tiny policy's config, same tokenizer
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "config.json").is_file():  # transformers >= 5 writes on distributed rank 0 only
        raise RuntimeError(f"save_pretrained wrote no model into {out} on this rank: build tiny reward "
                           "models on the main rank first (trainer.setup.main_first)")
    meta = {
        "format": FORMAT_VERSION,
        "rm_format": RM_FORMAT_VERSION,
        "cache_key": spec.cache_key(),
        **dataclasses.asdict(spec),
    }
    (out / "tiny_spec.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def ensure_tiny_reward_model(spec: TinyModelSpec, cache_dir: str | Path) -> Path:
    """Returns ``cache_dir/rm-<arch>-<key>``, building it atomically first if absent."""
    spec.validate()
    root = Path(cache_dir)
    final = root / f"rm{RM_FORMAT_VERSION}-{spec.arch}-{spec.cache_key()}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        build_tiny_reward_model(spec, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    """CLI: builds (or finds) one tiny RM and prints its directory."""
    parser = argparse.ArgumentParser(
        prog="python -m metaapo_nemo.reward.tiny_rm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(ensure_tiny_reward_model(TinyModelSpec(arch=args.arch, seed=args.seed), args.cache_dir))


if __name__ == "__main__":
    main()
