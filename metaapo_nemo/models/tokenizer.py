"""A small byte-level BPE tokenizer with a ChatML chat template, trained locally.

Tiny test/benchmark checkpoints need a real `tokenizers` pipeline (so they go through the
same import path as a downloaded model) but nothing may be downloaded, so the tokenizer is
trained in-process on a seeded, generated English-like corpus. Training is deterministic:
the same corpus and vocab size give the same vocab and merges.

Chat-template contract the data pipeline relies on, for messages ``M`` and one assistant
reply ``R``::

    ids(render(M, add_generation_prompt=True))  is a token prefix of  ids(render(M + [R]))
    ids(render(M + [R]))[-1] == eos_token_id    (``<|im_end|>``; no trailing "\\n")

Two choices make this hold for any message content:

* the template omits the "\\n" after the LAST message, so an assistant turn ends exactly
  with ``<|im_end|>`` (every earlier message is followed by "\\n");
* BPE training isolates every "\\n", so no learned merge contains a newline: the "\\n"
  closing ``<|im_start|>assistant\\n`` stays one token whatever the reply starts with
  (another newline, a space, punctuation).

Encoding uses Qwen2's exact normalizer + pre-tokenizer (NFC, Qwen2 split regex, byte-level)
because transformers 5's `AutoTokenizer` rebuilds that pipeline from vocab and merges for
every ``model_type="qwen2"`` checkpoint; Llama checkpoints load ``tokenizer.json`` as is.
Both therefore encode exactly like the tokenizer returned here.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import (
    PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX,
)

PAD_TOKEN = "<|pad|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: pad=0, endoftext=1, im_start=2, im_end=3.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
# 256 byte symbols + the special tokens: a smaller vocab cannot encode arbitrary text.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# ChatML. Newline after every message except the last; see the module docstring.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' -}}"
    "{%- if not loop.last or add_generation_prompt -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_SUBJECTS = ["the model", "a student", "my friend", "the teacher", "our team", "this robot",
             "the cat", "a scientist", "the user", "an assistant", "the city", "every child"]
_VERBS = ["reads", "writes", "builds", "finds", "explains", "answers", "solves", "likes",
          "computes", "learns", "checks", "shares", "counts", "trains", "remembers"]
_OBJECTS = ["a short story", "the answer", "three apples", "the question", "a long list",
            "the data", "some numbers", "a new idea", "the results", "two books", "a map",
            "the weather", "a simple proof", "the code", "every token"]
_ADVERBS = ["quickly", "carefully", "today", "again", "slowly", "well", "at night",
            "with care", "in time", "for fun"]
_OPENERS = ["Hello!", "Sure,", "Well,", "Yes.", "No.", "Thanks!", "Okay:", "Note:", "Q:", "A:"]
_PUNCT = [".", "!", "?", ";", ",", ":"]
_ROLES = ["system", "user", "assistant"]


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
    if rng.random() < 0.5:
        words.append(rng.choice(_ADVERBS))
    if rng.random() < 0.4:
        words.append(f"{rng.randint(0, 9999)}")
    text = " ".join(words)
    if rng.random() < 0.3:
        text = f"{rng.choice(_OPENERS)} {text}"
    return text[0].upper() + text[1:] + rng.choice(_PUNCT)


def builtin_corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    """Generates a seeded English-like corpus with digits, punctuation and newlines.

    Args:
        num_lines: Number of lines (each 1-3 sentences) to generate.
        seed: Seed of the private `random.Random`; the global RNG is not touched.

    Returns:
        The lines. Some contain embedded newlines, some are arithmetic or role lines so
        that "user", "assistant", digits and "=" get merges of their own.
    """
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        kind = i % 5
        if kind == 3:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}.")
        elif kind == 4:
            lines.append(f"{rng.choice(_ROLES)}\n{_sentence(rng)}")
        else:
            sep = "\n" if rng.random() < 0.3 else " "
            lines.append(sep.join(_sentence(rng) for _ in range(rng.randint(1, 3))))
    return lines


def _iter_corpus(corpus: Iterable[str] | None) -> Iterator[str]:
    yield from builtin_corpus()
    if corpus is not None:
        yield from corpus


def _qwen2_pre_tokenizers() -> list[pre_tokenizers.PreTokenizer]:
    # Exactly Qwen2Tokenizer's pipeline: transformers 5 rebuilds it from vocab + merges for
    # any model_type="qwen2" checkpoint (ignoring tokenizer.json's pre-tokenizer), so
    # both archs use it to encode identically whichever class AutoTokenizer picks.
    return [
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]


def build_tokenizer(
    vocab_size: int = 512, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Trains a deterministic byte-level BPE tokenizer and wraps it for transformers.

    Args:
        vocab_size: Target vocab size including the 4 special tokens and the 256 byte
            symbols. The trained vocab can be smaller when the corpus runs out of merges,
            so callers must use ``len(tokenizer)``, not this number.
        corpus: Extra texts to train on, after the built-in corpus.

    Returns:
        A `PreTrainedTokenizerFast` with eos ``<|im_end|>``, pad ``<|pad|>``, no BOS and no
        UNK (byte-level BPE encodes every string), and a ChatML ``chat_template``.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the byte alphabet and special tokens.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens = {MIN_VOCAB_SIZE}; use >= {MIN_VOCAB_SIZE}"
        )
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Training only: every "\n" is its own word, so no merge contains a newline.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), *_qwen2_pre_tokenizers()]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_iter_corpus(corpus), trainer=trainer)
    tok.pre_tokenizer = pre_tokenizers.Sequence(_qwen2_pre_tokenizers())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        # No BOS, as in Qwen's ChatML: a prompt is exactly its template rendering, so
        # prompt/response token boundaries need no "strip the BOS" special cases.
        bos_token=None,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        # Marks them special so decode(..., skip_special_tokens=True) drops them too.
        # (transformers 5 renamed `additional_special_tokens` to `extra_special_tokens`.)
        extra_special_tokens=[ENDOFTEXT_TOKEN, IM_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        # Keep decode(encode(text)) == text: the cleanup would turn " ." into ".".
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
