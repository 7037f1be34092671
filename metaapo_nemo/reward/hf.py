"""Bradley-Terry reward model from an HF sequence-classification checkpoint.

The RM has its own tokenizer and chat template: each (prompt messages, response) pair is
rendered with the RM's template as ``messages + [{"role": "assistant", "content": text}]``
and re-tokenised (the policy's token ids are never reused: vocabularies differ in
general). The score is the scalar head (``num_labels == 1``) at the last non-padding
token, which transformers' ``*ForSequenceClassification`` picks from ``pad_token_id``.

Precision: bfloat16 on GPU, float32 on CPU (``reward.dtype=auto``). With
``reward.offload_to_cpu`` the weights live in CPU memory between calls and visit the
accelerator only inside `score` (a no-op on a CPU-only machine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from metaapo_nemo.reward.base import Message

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class HFRewardModel:
    """`RewardModel` backed by ``AutoModelForSequenceClassification``."""

    def __init__(
        self,
        path: str | Path,
        batch_size: int = 16,
        dtype: str = "auto",
        offload_to_cpu: bool = True,
        device: str | torch.device | None = None,
        max_length: int | None = None,
    ):
        """Loads the checkpoint.

        Args:
            path: HF directory with config, weights, tokenizer and a chat template.
            batch_size: Texts per forward.
            dtype: "auto", "float32" or "bfloat16".
            offload_to_cpu: Keep the weights on the CPU between `score` calls.
            device: Where to score (default: the current CUDA device, else CPU).
            max_length: Truncate texts to this many tokens (None: no truncation).

        Raises:
            ValueError: Not a scalar-head model, or the tokenizer has no chat template.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = str(path)
        self.device = (
            torch.device(device)
            if device is not None
            else (
                torch.device("cuda", torch.cuda.current_device())
                if torch.cuda.is_available()
                else torch.device("cpu")
            )
        )
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size, self.offload, self.max_length = batch_size, offload_to_cpu, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"reward model {self.path}: its tokenizer has no chat template; "
                "the RM must render conversations the way it was trained"
            )
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=self.dtype)
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {self.path} has num_labels={self.model.config.num_labels}; "
                "a Bradley-Terry RM has one scalar head (num_labels=1)"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model.eval().requires_grad_(False)
        self.model.to("cpu" if self.offload else self.device)

    @property
    def resident_device(self) -> torch.device:
        """Where the weights are right now."""
        return next(self.model.parameters()).device

    def render(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[str]:
        """The texts the RM reads: its chat template over prompt + assistant response."""
        return [
            self.tokenizer.apply_chat_template(
                [dict(m) for m in msgs] + [{"role": "assistant", "content": text}], tokenize=False
            )
            for msgs, text in zip(prompts, responses)
        ]

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        moved = self.offload and self.device.type != "cpu"
        if moved:
            self.model.to(self.device)
        try:
            yield
        finally:
            if moved:
                self.model.to("cpu")
                torch.cuda.empty_cache()

    @torch.no_grad()
    def score(self, prompts: Sequence[Sequence[Message]], responses: Sequence[str]) -> list[float]:
        """Scalar scores, batched by `batch_size` (float32 values whatever the dtype)."""
        texts = self.render(prompts, responses)
        out: list[float] = []
        with self._on_device():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                )
                logits = self.model(**enc.to(self.device)).logits
                out.extend(logits[:, 0].float().cpu().tolist())
        return out
