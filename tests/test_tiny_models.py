"""Tiny local checkpoints: build, reload through the HF import path, tokenizer contracts."""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from metaapo_nemo.models import tiny
from metaapo_nemo.models.tiny import (
    TinyModelSpec,
    build_tiny_checkpoint,
    ensure_tiny_checkpoint,
    main,
    padded_vocab_size,
)
from metaapo_nemo.models.tokenizer import MIN_VOCAB_SIZE, build_tokenizer, builtin_corpus

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)

ARCHS = ("llama", "qwen2")
# Smallest spec vLLM would still accept (head_dim 32); keeps every build well under 1 s.
SMALL = dict(hidden_size=64, num_layers=1, num_attention_heads=2, num_key_value_heads=1,
             intermediate_size=128)

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are helpful."},
     {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "Again, with\nnewlines\n\n"}],
    [{"role": "user", "content": ""}],
]
REPLIES = ["Hello!", "42.", "\nStarts with a newline.", " leading space", "\n\n  x\n", "",
           "...!?", "The cat reads 3 apples quickly."]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_checkpoint(TinyModelSpec(arch=arch), root / arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("arch", ARCHS)
def test_reload_and_forward(ckpts: dict[str, Path], arch: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(ckpts[arch])
    tokenizer = AutoTokenizer.from_pretrained(ckpts[arch])
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert model.dtype == torch.float32
    vocab = model.config.vocab_size
    assert vocab == padded_vocab_size(len(tokenizer)) and vocab % 64 == 0
    assert len(tokenizer) <= TinyModelSpec().vocab_size
    ids = torch.tensor([tokenizer.encode("The model reads 3 apples.")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], vocab)
    assert torch.isfinite(logits).all()
    cfg = model.config
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (
        tokenizer.eos_token_id, tokenizer.pad_token_id, None)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.bos_token is None
    gen = GenerationConfig.from_pretrained(ckpts[arch])
    assert gen.eos_token_id == tokenizer.eos_token_id
    spec_file = json.loads((ckpts[arch] / "tiny_spec.json").read_text())
    assert spec_file["cache_key"] == TinyModelSpec(arch=arch).cache_key()


def test_arch_specifics(ckpts: dict[str, Path]) -> None:
    qwen = AutoModelForCausalLM.from_pretrained(ckpts["qwen2"])
    llama = AutoModelForCausalLM.from_pretrained(ckpts["llama"])
    assert qwen.config.tie_word_embeddings
    assert qwen.lm_head.weight.data_ptr() == qwen.model.embed_tokens.weight.data_ptr()
    attn = qwen.model.layers[0].self_attn
    assert all(getattr(attn, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None
    assert qwen.config.use_sliding_window is False
    assert not llama.config.tie_word_embeddings
    assert not torch.equal(llama.lm_head.weight, llama.model.embed_tokens.weight)
    assert not any(n.endswith(".bias") for n, _ in llama.named_parameters())
    with safe_open(ckpts["llama"] / "model.safetensors", "pt") as f:
        assert "lm_head.weight" in f.keys()


def test_tie_override(tmp_path: Path) -> None:
    spec = TinyModelSpec(arch="qwen2", tie_word_embeddings=False, **SMALL)
    model = AutoModelForCausalLM.from_pretrained(build_tiny_checkpoint(spec, tmp_path))
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2),
         "head_dim = hidden_size / num_attention_heads = 128 / 8 = 16 < 32"),
        (dict(num_attention_heads=4, num_key_value_heads=3),
         "num_key_value_heads=3 does not divide num_attention_heads=4"),
        (dict(hidden_size=100, num_attention_heads=3, num_key_value_heads=1),
         "num_attention_heads=3 does not divide hidden_size=100"),
        (dict(arch="gpt2"), "arch='gpt2' is not supported"),
        (dict(vocab_size=100), f"use vocab_size >= {MIN_VOCAB_SIZE}"),
        (dict(num_layers=0), "num_layers=0 must be > 0"),
    ],
)
def test_validate(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        TinyModelSpec(**overrides).validate()


def test_head_dim_message_suggests_fix() -> None:
    with pytest.raises(ValueError, match="use num_attention_heads <= 4 or hidden_size >= 256"):
        TinyModelSpec(hidden_size=128, num_attention_heads=8).validate()


def test_deterministic_weights(tmp_path: Path) -> None:
    spec = TinyModelSpec(arch="qwen2", **SMALL)
    rng_before = torch.get_rng_state()
    a = build_tiny_checkpoint(spec, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), rng_before), "build must not move the global RNG"
    b = build_tiny_checkpoint(spec, tmp_path / "b")
    c = build_tiny_checkpoint(dataclasses.replace(spec, seed=1), tmp_path / "c")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_cache_key() -> None:
    base = TinyModelSpec()
    key = base.cache_key()
    assert len(key) == 12 and all(ch in string.hexdigits for ch in key)
    assert TinyModelSpec().cache_key() == key
    # None resolves per arch, so the explicit default shares the cache entry.
    assert TinyModelSpec(tie_word_embeddings=False).cache_key() == key
    assert TinyModelSpec(arch="qwen2").cache_key() == TinyModelSpec(
        arch="qwen2", tie_word_embeddings=True).cache_key()
    changed = {"arch": "qwen2", "vocab_size": 600, "hidden_size": 256, "num_layers": 3,
               "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 512,
               "max_position_embeddings": 2048, "rope_theta": 1e6, "rms_norm_eps": 1e-5,
               "tie_word_embeddings": True, "seed": 1}
    assert set(changed) == {f.name for f in dataclasses.fields(TinyModelSpec)}
    keys = {dataclasses.replace(base, **{k: v}).cache_key() for k, v in changed.items()}
    assert len(keys) == len(changed) and key not in keys


def test_ensure_cache_hit_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TinyModelSpec(arch="llama", **SMALL)
    path = ensure_tiny_checkpoint(spec, tmp_path / "cache")
    assert path == tmp_path / "cache" / f"llama-{spec.cache_key()}"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cache hit must not rebuild")

    monkeypatch.setattr(tiny, "build_tiny_checkpoint", no_rebuild)
    assert ensure_tiny_checkpoint(spec, tmp_path / "cache") == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes
    AutoModelForCausalLM.from_pretrained(path)


def test_ensure_failed_build_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def half_build(spec: TinyModelSpec, out_dir: Path, corpus=None) -> Path:
        (Path(out_dir) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "build_tiny_checkpoint", half_build)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_tiny_checkpoint(TinyModelSpec(**SMALL), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_ensure_lost_race_keeps_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TinyModelSpec(**SMALL)
    final = tmp_path / f"llama-{spec.cache_key()}"

    def racing_build(spec: TinyModelSpec, out_dir: Path, corpus=None) -> Path:
        (Path(out_dir) / "ours").write_text("x")
        final.mkdir()  # another process finished first
        (final / "theirs").write_text("x")
        return Path(out_dir)

    monkeypatch.setattr(tiny, "build_tiny_checkpoint", racing_build)
    assert ensure_tiny_checkpoint(spec, tmp_path) == final
    assert [p.name for p in tmp_path.iterdir()] == [final.name]
    assert [p.name for p in final.iterdir()] == ["theirs"]


def _ids(tokenizer, messages: list[dict], **kwargs) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("source", ["built", "llama", "qwen2"])
def test_chat_template_prefix_and_eos(ckpts: dict[str, Path], tok, source: str) -> None:
    tokenizer = tok if source == "built" else AutoTokenizer.from_pretrained(ckpts[source])
    for messages in CONVERSATIONS:
        prompt = _ids(tokenizer, messages, add_generation_prompt=True)
        assert prompt == tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False)
        for reply in REPLIES:
            full = _ids(tokenizer, [*messages, {"role": "assistant", "content": reply}])
            assert full[: len(prompt)] == prompt, (messages, reply)
            assert full[-1] == tokenizer.eos_token_id, (messages, reply)
            assert tokenizer.decode(full[len(prompt):-1]) == reply


def test_chat_template_rendering(tok) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n")
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": "A"}],
                                   tokenize=False)
    assert full.endswith("<|im_start|>assistant\nA<|im_end|>")


def test_roundtrip_ascii(tok) -> None:
    texts = [string.printable, "Hello,  world!\n\n\tTabs\r\nand 12345 digits.", "   ", "",
             "user\nassistant\n<|im_start|> is special", *builtin_corpus(20, seed=3)]
    for text in texts:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tokenizer_specials_and_corpus(tok) -> None:
    assert tok.convert_tokens_to_ids(["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]) \
        == [0, 1, 2, 3]
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # no BOS/EOS added
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert not any("Ċ" in a + b for a, b in merges), "a merge containing a newline"
    extra = build_tokenizer(corpus=["zyzzyva quokka"] * 50)
    assert len(extra.encode("zyzzyva", add_special_tokens=False)) == 1
    assert len(tok.encode("zyzzyva", add_special_tokens=False)) > 1
    with pytest.raises(ValueError, match=f"use >= {MIN_VOCAB_SIZE}"):
        build_tokenizer(vocab_size=200)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    main(["--arch", "qwen2", "--out", str(out), "--hidden-size", "64", "--num-layers", "1",
          "--num-attention-heads", "2", "--num-key-value-heads", "1", "--intermediate-size",
          "96", "--rope-theta", "500000", "--tie-word-embeddings", "false", "--seed", "3"])
    assert capsys.readouterr().out.strip() == str(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (
        "qwen2", 64, 1, 96)
    assert cfg.rope_parameters["rope_theta"] == 500000 and not cfg.tie_word_embeddings

    main(["--cache-dir", str(tmp_path / "cache"), "--hidden-size", "64",
          "--num-attention-heads", "2", "--num-key-value-heads", "1", "--num-layers", "1"])
    cached = Path(capsys.readouterr().out.strip())
    assert cached.parent == tmp_path / "cache" and (cached / "model.safetensors").is_file()

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "bad"), "--num-attention-heads", "8"])
    assert exc.value.code == 2
    assert "head_dim = hidden_size / num_attention_heads = 128 / 8 = 16" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
