"""Tiny random-init Hugging Face checkpoints (Llama, Qwen2) built locally, never downloaded.

Tests, the default CPU recipe and the benchmarks load these through the same
``from_pretrained(path)`` import path as a real checkpoint. A checkpoint directory holds
``config.json``, ``generation_config.json``, ``model.safetensors`` (float32), the tokenizer
files from `metaapo_nemo.models.tokenizer` and ``tiny_spec.json`` (the spec and its key).

The model's ``vocab_size`` is ``len(tokenizer)`` rounded UP to a multiple of 64
(`VOCAB_MULTIPLE`), as real checkpoints pad their embeddings: tensor-parallel vocab
sharding can then split it evenly without re-padding. The padding rows are never produced
by the tokenizer.

CLI::

    python -m metaapo_nemo.models.tiny --arch qwen2 --out /tmp/tiny-qwen2 [--hidden-size 128 ...]
    python -m metaapo_nemo.models.tiny --arch llama --cache-dir ~/.cache/metaapo_tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from metaapo_nemo.models.arch import TINY_EXPERTS, TINY_TOP_K  # qwen3_moe: experts of I / 2, top k
from metaapo_nemo.models.tokenizer import MIN_VOCAB_SIZE, build_tokenizer

# Bump whenever the same spec would produce different files (corpus, template, config
# fields), so `ensure_tiny_checkpoint` stops serving stale cache entries.
FORMAT_VERSION = 1
VOCAB_MULTIPLE = 64
# vLLM's attention kernels reject head sizes below 32.
MIN_HEAD_DIM = 32
ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class TinyModelSpec:
    """Architecture and seed of a tiny checkpoint. Every field is a CLI flag of `main`.

    Attributes:
        arch: "llama" (untied, no attention bias), "qwen2" (q/k/v bias, tied by default) or
            "qwen3" (per-head q/k RMSNorm, no bias, untied by default like Qwen3-8B) or
            "qwen3_moe" (Qwen3 attention, `TINY_EXPERTS` experts of intermediate_size / 2,
            top `TINY_TOP_K`, renormalised).
        vocab_size: Target size of the trained BPE vocab. The tokenizer may come out
            smaller; the model's vocab is ``len(tokenizer)`` rounded up to a multiple of 64.
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_attention_heads: Query heads; ``hidden_size / num_attention_heads >= 32``.
        num_key_value_heads: KV heads (GQA); must divide ``num_attention_heads``.
        intermediate_size: MLP width.
        max_position_embeddings: Longest sequence the config declares.
        rope_theta: RoPE base.
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: None means the architecture's usual choice: llama False,
            qwen2 True, qwen3 False.
        seed: `torch.manual_seed` used for the weight init.
    """

    arch: Literal["llama", "qwen2", "qwen3", "qwen3_moe"] = "llama"
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool | None = None
    seed: int = 0

    @property
    def tied(self) -> bool:
        """`tie_word_embeddings` with None resolved per architecture."""
        if self.tie_word_embeddings is None:
            return self.arch == "qwen2"
        return self.tie_word_embeddings

    @property
    def head_dim(self) -> int:
        """Per-head width, ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Checks the spec builds a model vLLM and Megatron accept.

        Raises:
            ValueError: With the field, the value, the arithmetic and a fix.
        """
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is not supported; use one of {ARCHS}")
        for name in ("hidden_size", "num_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size={self.vocab_size} < {MIN_VOCAB_SIZE} (256 byte symbols + 4 special "
                f"tokens of the byte-level BPE); use vocab_size >= {MIN_VOCAB_SIZE}"
            )
        h, n, kv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if h % n != 0:
            raise ValueError(
                f"num_attention_heads={n} does not divide hidden_size={h} ({h} % {n} = {h % n})"
            )
        if h // n < MIN_HEAD_DIM:
            raise ValueError(
                f"head_dim = hidden_size / num_attention_heads = {h} / {n} = {h // n} < "
                f"{MIN_HEAD_DIM}, which vLLM rejects; use num_attention_heads <= "
                f"{max(1, h // MIN_HEAD_DIM)} or hidden_size >= {n * MIN_HEAD_DIM}"
            )
        if (h // n) % 2 != 0:
            raise ValueError(f"head_dim = {h} / {n} = {h // n} must be even for RoPE")
        if n % kv != 0:
            raise ValueError(
                f"num_key_value_heads={kv} does not divide num_attention_heads={n} "
                f"({n} % {kv} = {n % kv}); GQA needs whole query groups per KV head"
            )
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError(
                f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} must be > 0"
            )

    def cache_key(self) -> str:
        """Short stable hash of every field (None resolved) and `FORMAT_VERSION`.

        Returns:
            12 hex characters; equal specs (and llama None vs False) share a key.
        """
        fields = dataclasses.asdict(self) | {"tie_word_embeddings": self.tied}
        payload = json.dumps({"format": FORMAT_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def padded_vocab_size(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Rounds ``n`` up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def _model_config(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    common = dict(
        vocab_size=padded_vocab_size(len(tokenizer)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        # transformers 5 folds `rope_theta` into `rope_parameters`; say it explicitly.
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tied,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    if spec.arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    if spec.arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, head_dim=spec.head_dim, attention_bias=False, use_sliding_window=False,
                              sliding_window=None, max_window_layers=spec.num_layers, num_experts=TINY_EXPERTS,
                              num_experts_per_tok=TINY_TOP_K, moe_intermediate_size=spec.intermediate_size // 2,
                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                              router_aux_loss_coef=0.001)
    if spec.arch == "qwen3":
        return Qwen3Config(**common, head_dim=spec.head_dim, attention_bias=False, use_sliding_window=False,
                           sliding_window=None, max_window_layers=spec.num_layers)
    # Qwen2Attention always has q/k/v biases (no config switch), as the real models do.
    return Qwen2Config(
        **common, use_sliding_window=False, sliding_window=None, max_window_layers=spec.num_layers
    )


def build_tiny_checkpoint(
    spec: TinyModelSpec, out_dir: str | Path, corpus: Iterable[str] | None = None
) -> Path:
    """Trains the tokenizer, random-inits the model and saves both in HF format.

    The weights depend only on ``spec`` (and the tokenizer length): the global torch RNG is
    forked, seeded with ``spec.seed`` and restored, so callers' RNG state is untouched.

    Args:
        spec: What to build; validated first.
        out_dir: Directory to write into (created if missing).
        corpus: Extra tokenizer training texts (see `build_tokenizer`).

    Returns:
        ``out_dir`` as a `Path`.
    """
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size, corpus)
    config = _model_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"format": FORMAT_VERSION, "cache_key": spec.cache_key(), **dataclasses.asdict(spec)}
    (out / "tiny_spec.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def ensure_tiny_checkpoint(spec: TinyModelSpec, cache_dir: str | Path) -> Path:
    """Returns ``cache_dir/<arch>-<cache_key>``, building it first if it is absent.

    The build goes to a temporary directory next to the target and is renamed into place,
    so a reader never sees a half-written checkpoint. If another process wins the race,
    its copy is kept and ours is removed.

    Args:
        spec: What to build.
        cache_dir: Parent directory of the cached checkpoints (created if missing).

    Returns:
        The checkpoint directory.
    """
    spec.validate()
    root = Path(cache_dir)
    final = root / f"{spec.arch}-{spec.cache_key()}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        build_tiny_checkpoint(spec, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m metaapo_nemo.models.tiny", description=__doc__.split("\n\n")[0]
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="write the checkpoint into this directory")
    where.add_argument("--cache-dir", type=Path, help="build into CACHE_DIR/<arch>-<key> once")
    for f in dataclasses.fields(TinyModelSpec):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "arch":
            parser.add_argument(flag, choices=ARCHS, default=f.default)
        elif f.name == "tie_word_embeddings":
            parser.add_argument(flag, type=_parse_bool, default=None,
                                help="true/false; default: llama false, qwen2 true, qwen3 false")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                help=f"default: {f.default}")
    return parser


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: builds one tiny checkpoint and prints its directory.

    Args:
        argv: Arguments without the program name; None reads `sys.argv`.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    names = [f.name for f in dataclasses.fields(TinyModelSpec)]
    spec = TinyModelSpec(**{name: getattr(args, name) for name in names})
    try:
        spec.validate()
    except ValueError as e:
        parser.error(str(e))  # exits 2 with the arithmetic, before anything is written
    if args.out is not None:
        path = build_tiny_checkpoint(spec, args.out)
    else:
        path = ensure_tiny_checkpoint(spec, args.cache_dir)
    print(path)


if __name__ == "__main__":
    main()
