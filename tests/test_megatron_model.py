"""HF -> Megatron-Core (local spec, CPU) parity, export round trip, CPU shims, log-probs."""

from __future__ import annotations

import json

import pytest
import torch

from metaapo_nemo.models.arch import arch_from_hf_dict, load_arch
from metaapo_nemo.models.convert import export_hf, fuse_gate_up, fuse_qkv, load_hf_weights, split_gate_up, split_qkv
from metaapo_nemo.models.megatron_model import BuildOptions, build_gpt_chunks, causal_mask

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _megatron_logits(chunks, ids):
    n, t = ids.shape
    pos = torch.arange(t).unsqueeze(0).expand(n, t)
    with torch.no_grad():
        return chunks[0].eval()(ids, pos, causal_mask(t, ids.device))


@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_qwen3_moe"])
def test_logits_match_hf_and_export_round_trips(which, request, single_ctx, tmp_path):
    path = request.getfixturevalue(which)
    arch = load_arch(path)
    chunks = build_gpt_chunks(arch, single_ctx, BuildOptions())
    load_hf_weights(chunks, path, arch, single_ctx)
    torch.manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (3, 40))
    hf = _hf_model(path)
    with torch.no_grad():
        ref = hf(ids).logits
    got = _megatron_logits(chunks, ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 1e-5

    out = export_hf(chunks, arch, single_ctx, path, tmp_path / "export")
    from safetensors.torch import load_file

    src, dst = load_file(str(path / "model.safetensors")), load_file(str(out / "model.safetensors"))
    if arch.tie_word_embeddings:
        src.pop("lm_head.weight", None)
    assert set(src) == set(dst)
    for k in src:
        assert torch.equal(src[k], dst[k]), k
    with torch.no_grad():
        assert torch.equal(_hf_model(out)(ids).logits, ref)


def test_qkv_and_gate_up_fusion_are_inverse_for_every_tp():
    arch = arch_from_hf_dict(dict(model_type="llama", vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=8, num_key_value_heads=4, intermediate_size=96))
    h, hd = 64, arch.head_dim
    q, k, v = torch.randn(8 * hd, h), torch.randn(4 * hd, h), torch.randn(4 * hd, h)
    gate, up = torch.randn(96, h), torch.randn(96, h)
    for tp in (1, 2, 4):
        shards = [fuse_qkv(q, k, v, arch, tp, r) for r in range(tp)]
        # each rank holds whole query groups: rows = (heads per group + 2) * hd * groups
        assert all(s.shape[0] == (2 + 2) * hd * (4 // tp) for s in shards)
        q2, k2, v2 = split_qkv(torch.cat(shards), arch)
        assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
        g2, u2 = split_gate_up([fuse_gate_up(gate, up, tp, r) for r in range(tp)])
        assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_group_layout_matches_megatron_convention():
    """Group g's fused rows are [q heads of g | k_g | v_g] (megatron's per-query-group layout)."""
    arch = arch_from_hf_dict(dict(model_type="llama", vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=32))
    hd = arch.head_dim
    q = torch.arange(4 * hd).float()[:, None]
    k = 1000 + torch.arange(2 * hd).float()[:, None]
    v = 2000 + torch.arange(2 * hd).float()[:, None]
    fused = fuse_qkv(q, k, v, arch, 1, 0)[:, 0]
    group0 = torch.cat([q[: 2 * hd, 0], k[:hd, 0], v[:hd, 0]])
    assert torch.equal(fused[: 4 * hd], group0)


def test_arch_refuses_unsupported_configs(tmp_path):
    base = dict(model_type="llama", vocab_size=64, hidden_size=64, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=32, max_position_embeddings=4096)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        arch_from_hf_dict(base | {"model_type": "gpt2"})
    with pytest.raises(ValueError, match="sliding_window=1024"):
        arch_from_hf_dict(base | {"model_type": "mistral", "sliding_window": 1024})
    with pytest.raises(ValueError, match="RoPE scaling type 'yarn'"):
        arch_from_hf_dict(base | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    llama31 = arch_from_hf_dict(base | {"rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert llama31.rope_scaling is not None and llama31.rope_theta == 5e5
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_arch(tmp_path)


def test_cpu_shims_active_only_without_cuda(single_ctx):
    from metaapo_nemo.parallel import cpu_compat

    assert cpu_compat.active() is (not torch.cuda.is_available())
    assert single_ctx.backend == ("nccl" if torch.cuda.is_available() else "gloo")
    # megatron's bookkeeping tensors on "cuda" land on the CPU under the shims
    assert torch.zeros(1, device="cuda").device.type == "cpu"


def test_token_logprobs_equal_log_softmax_and_mask_padded_vocab(single_ctx):
    from metaapo_nemo.models.logprobs import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 50, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 40, (2, 7))
    got = token_logprobs(logits, labels, vocab_size=50, ctx=single_ctx)
    want = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert (got - want).abs().max().item() < 1e-6
    got.sum().backward()
    # vocabulary rows past the real size (TP padding) get no probability mass
    padded = token_logprobs(logits.detach(), labels, vocab_size=40, ctx=single_ctx)
    want_pad = torch.log_softmax(logits.detach()[..., :40], -1).gather(-1, labels[..., None])[..., 0]
    assert (padded - want_pad).abs().max().item() < 1e-6


def test_tiny_checkpoint_config_is_what_the_converter_reads(tiny_qwen2):
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    arch = load_arch(tiny_qwen2)
    assert arch.qkv_bias and arch.tie_word_embeddings and arch.head_dim >= 32
    assert arch.vocab_size == cfg["vocab_size"]


def test_rank_slices_read_from_disk_equal_slices_of_the_full_tensors(tmp_path):
    """Each TP rank reads only its slice (safetensors get_slice) and gets exactly the
    rows/columns megatron expects, including vocabulary padding (130 -> multiple of tp)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.models.convert import _read_rank_slice, _SafetensorsReader, pad_vocab
    from metaapo_nemo.models.megatron_model import padded_vocab_size

    cfg = LlamaConfig(vocab_size=130, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    arch = load_arch(tmp_path)
    reader = _SafetensorsReader(tmp_path)
    full = lambda n: reader.get(n)  # noqa: E731
    p = "model.layers.0."
    for tp in (1, 2, 4):
        for rank in range(tp):
            got_qkv = _read_rank_slice("qkv", (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight",
                                               p + "self_attn.v_proj.weight"), reader, arch, tp, rank)
            want_qkv = fuse_qkv(full(p + "self_attn.q_proj.weight"), full(p + "self_attn.k_proj.weight"),
                                full(p + "self_attn.v_proj.weight"), arch, tp, rank)
            assert torch.equal(got_qkv, want_qkv)
            gu = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
            assert torch.equal(_read_rank_slice("gate_up", gu, reader, arch, tp, rank),
                               fuse_gate_up(full(gu[0]), full(gu[1]), tp, rank))
            o = p + "self_attn.o_proj.weight"
            assert torch.equal(_read_rank_slice("row", (o,), reader, arch, tp, rank), full(o).chunk(tp, 1)[rank])
            emb = "model.embed_tokens.weight"
            want = pad_vocab(full(emb), padded_vocab_size(130, tp)).chunk(tp, 0)[rank]
            assert torch.equal(_read_rank_slice("vocab", (emb,), reader, arch, tp, rank), want)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_qwen3_with_head_dim_apart_from_hidden_matches_hf_and_round_trips(tied, single_ctx, tmp_path):
    """Qwen3's explicit head_dim (heads x head_dim = 64 on a 32-wide model, as Qwen3-0.6B's
    16 x 128 on 1024): megatron's kv_channels and the q/k norms of size head_dim; tied
    embeddings as the small Qwen3s (0.6B-4B), untied as 8B."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=tied))
    with torch.no_grad():  # the norms start at 1: make them matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "hf")
    arch = load_arch(tmp_path / "hf")
    assert arch.qk_norm and arch.head_dim == 16 and arch.tie_word_embeddings == tied
    chunks = build_gpt_chunks(arch, single_ctx, BuildOptions())
    load_hf_weights(chunks, tmp_path / "hf", arch, single_ctx)
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
    assert (_megatron_logits(chunks, ids) - ref).abs().max().item() < 1e-5
    out = export_hf(chunks, arch, single_ctx, tmp_path / "hf", tmp_path / "export")
    src, dst = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(src) == set(dst) and any("q_norm" in k for k in src)
    assert all(torch.equal(src[k], dst[k]) for k in src)


def test_moe_router_loss_ignores_padding_and_is_the_mean_over_microbatches(tiny_qwen3_moe, single_ctx):
    """Padding (row tails, shared-prompt placeholders) stays out of the router's load-balancing
    loss: with the preference loss at zero, the pad token's embedding gets no gradient (without
    the padding mask megatron's RMSNorm of a zero hidden state blew it up to ~1e4). And each
    micro-batch's router loss weighs coef / (the step's micro-batches): the same micro-batches
    sent twice give the same router gradient (their mean), not twice it."""
    from metaapo_nemo.models.policy import MegatronLM, OptimSettings
    from metaapo_nemo.trainer.batching import to_microbatches
    from metaapo_nemo.trainer.rows import RowLayout
    from tasks.synthetic import chat_lengths, synthetic_pairs

    optim = OptimSettings(lr=1e-3, min_lr=1e-4, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                          clip_grad=0.0, warmup_steps=0, total_steps=10, schedule="constant")
    arch = load_arch(tiny_qwen3_moe)
    model = MegatronLM(arch, single_ctx, tiny_qwen3_moe, BuildOptions(explicit_positions=True, attention="sdpa"),
                       optim, pad_id=0)
    pairs = synthetic_pairs(4, 250, chat_lengths((3, 40), (2, 40)), seed=3, eos_id=2)
    mbs = to_microbatches(pairs, 2, 0, single_ctx.device, RowLayout("bucket", share_prompt=True))
    assert any(mb.padding_NT.any() for mb in mbs)

    def router_grads(batches):
        model.zero_grad()
        model.run(batches, lambda mb, logps: (mb.sequence_logps(logps).sum() * 0.0, {}), forward_only=False)
        return model.main_grads()

    once = router_grads(mbs)
    assert once["0.module.embedding.word_embeddings.weight"][0].abs().max().item() == 0.0  # pad id 0
    router = [k for k in once if k.endswith("mlp.router.weight")]
    assert router and all(once[k].abs().max() > 0 for k in router)
    twice = router_grads(mbs + mbs)  # the same micro-batches twice: the mean is unchanged
    for k in router:
        torch.testing.assert_close(twice[k], once[k], rtol=1e-5, atol=1e-9)


@pytest.mark.dist
@pytest.mark.stack
@pytest.mark.parametrize("tp,pp,ep", [pytest.param(2, 1, 2, id="tp2_ep2_sp", marks=pytest.mark.slow),
                                      pytest.param(1, 1, 2, id="ep2", marks=pytest.mark.slow),
                                      pytest.param(2, 1, 1, id="tp2_sp", marks=pytest.mark.slow),
                                      pytest.param(1, 2, 2, id="pp2_ep2", marks=pytest.mark.slow)])
def test_qwen3_moe_layouts_match_hf_and_export_bit_exact(tp, pp, ep, tiny_qwen3_moe, tmp_path):
    """Over gloo: each rank holds num_experts / ep of the experts (EP), every expert split over TP
    (expert tensor parallelism, with sequence parallelism, which megatron requires for MoE with
    TP; odd prompt lengths padded to the TP multiple), layers split over PP: the chat prompts'
    logits equal HF's and the export (experts broadcast from their EP rank, TP shards gathered,
    stages broadcast) is bit-exact."""
    import json

    from tests.dist_utils import REPO, torchrun

    spec = {"hf_dir": str(tiny_qwen3_moe), "tp": tp, "pp": pp, "ep": ep, "sequence_parallel": tp > 1, "prompts": 6,
            "out": str(tmp_path / "result.json"), "export_dir": str(tmp_path / "export")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    world = tp * pp * ep  # ep splits the data-parallel ranks: dp = ep here
    torchrun(world, REPO / "tests" / "workers" / "parity_worker.py", [str(tmp_path / "spec.json")],
             tmp_path / "worker.log", timeout=600)
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["prompts"] == 6 and report["ep"] == ep
    assert report["max_abs_logit_diff"] < 1e-5 and report["argmax_agreement"] == 1.0, report
    assert report["export_bit_exact"], report
