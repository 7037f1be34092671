"""One declarative mapping per model family (metaapo_nemo/models/families/): the registry,
the config rules each family carries, and the messages for what no family maps."""

from __future__ import annotations

import pytest
import torch

from metaapo_nemo.models.arch import arch_from_hf_dict
from metaapo_nemo.models.convert import megatron_param_sources
from metaapo_nemo.models.families import FAMILIES, SUPPORTED, family_of

pytestmark = pytest.mark.stack

BASE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=128)


def test_one_family_per_model_type():
    assert SUPPORTED == ("llama", "qwen2", "mistral", "qwen3", "qwen3_moe") == tuple(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.model_type == name
        kinds = {kind for kind, _ in (*family.layer.values(), *family.globals.values())}
        assert kinds <= {"replicated", "row", "gate_up", "qkv", "vocab"}
    with pytest.raises(ValueError, match=r"model_type='gemma' is not supported; supported: llama, qwen2, mistral, qwen3, qwen3_moe"):
        family_of("gemma", "x/config.json")


def test_family_rules_shape_the_arch():
    assert arch_from_hf_dict(BASE | {"model_type": "qwen2"}).qkv_bias  # always, for Qwen2
    assert not arch_from_hf_dict(BASE | {"model_type": "llama"}).qkv_bias
    assert arch_from_hf_dict(BASE | {"model_type": "llama", "attention_bias": True}).qkv_bias
    # Qwen2's window counts only with use_sliding_window; Mistral's always
    assert arch_from_hf_dict(BASE | {"model_type": "qwen2", "sliding_window": 16}).model_type == "qwen2"
    with pytest.raises(ValueError, match="sliding_window=16 < max_position_embeddings=128"):
        arch_from_hf_dict(BASE | {"model_type": "qwen2", "sliding_window": 16, "use_sliding_window": True})
    with pytest.raises(ValueError, match="sliding_window=16 < max_position_embeddings=128"):
        arch_from_hf_dict(BASE | {"model_type": "mistral", "sliding_window": 16})


def test_qwen3_norms_queries_and_keys_per_head_with_an_explicit_head_dim():
    """Qwen3: q/k RMSNorm (megatron's q/k_layernorm, replicated), no bias unless attention_bias,
    head_dim from the config even where heads x head_dim != hidden_size (Qwen3-0.6B: 16 x 128
    on 1024), the window only with use_sliding_window; its parameter count is the HF model's."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = BASE | {"model_type": "qwen3", "head_dim": 16}
    arch = arch_from_hf_dict(cfg)
    assert arch.qk_norm and not arch.qkv_bias and arch.head_dim == 16
    assert arch.num_attention_heads * arch.head_dim != arch.hidden_size
    assert arch_from_hf_dict(cfg | {"attention_bias": True}).qkv_bias
    assert not arch_from_hf_dict(BASE | {"model_type": "qwen2"}).qk_norm
    with pytest.raises(ValueError, match="sliding_window=16 < max_position_embeddings=128"):
        arch_from_hf_dict(cfg | {"sliding_window": 16, "use_sliding_window": True})
    hf = AutoModelForCausalLM.from_config(Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"}))
    assert arch.num_parameters == sum(p.numel() for p in hf.parameters())
    layer = FAMILIES["qwen3"].layer
    assert layer["self_attention.q_layernorm.weight"] == ("replicated", ("self_attn.q_norm.weight",))
    assert layer["self_attention.k_layernorm.weight"] == ("replicated", ("self_attn.k_norm.weight",))


MOE = BASE | {"model_type": "qwen3_moe", "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 24, "norm_topk_prob": True, "router_aux_loss_coef": 0.001}


def test_qwen3_moe_arch_counts_every_expert_and_refuses_dense_layers():
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    arch = arch_from_hf_dict(MOE)
    assert (arch.num_experts, arch.experts_per_token, arch.moe_intermediate_size) == (4, 2, 24)
    assert arch.qk_norm and arch.norm_topk_prob and arch.router_aux_loss_coef == 0.001
    hf = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**{k: v for k, v in MOE.items() if k != "model_type"}))
    assert arch.num_parameters == sum(p.numel() for p in hf.parameters())
    # transformers 5 saves num_experts as num_local_experts; the hub's configs say num_experts
    renamed = {k: v for k, v in MOE.items() if k != "num_experts"} | {"num_local_experts": 4}
    assert arch_from_hf_dict(renamed) == arch
    for bad, match in (({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\]: layers with a dense MLP"),
                       ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
                       ({"num_experts_per_tok": 5}, r"num_experts_per_tok=5 must be in 1..num_experts=4")):
        with pytest.raises(ValueError, match=match):
            arch_from_hf_dict(MOE | bad)


def test_expert_parameters_map_local_indices_to_global_hf_names():
    """``{e}`` is the expert's index on its expert-parallel rank; the HF name the global one."""
    fam = FAMILIES["qwen3_moe"]
    assert fam.expert_sources("mlp.experts.local_experts.1.linear_fc1.weight", 4, 0) == (
        "gate_up", ("mlp.experts.1.gate_proj.weight", "mlp.experts.1.up_proj.weight"))
    assert fam.expert_sources("mlp.experts.local_experts.1.linear_fc2.weight", 4, 2) == (
        "row", ("mlp.experts.9.down_proj.weight",))
    assert fam.expert_sources("mlp.experts.linear_fc1.weight3", 2, 1)[1][0] == "mlp.experts.5.gate_proj.weight"
    assert fam.expert_sources("mlp.router.weight", 4, 0) is None
    assert fam.layer["mlp.router.weight"] == ("replicated", ("mlp.gate.weight",))
    assert "mlp.linear_fc1.weight" not in fam.layer


def test_a_parameter_no_family_maps_is_named_with_the_family_file():
    class Chunk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = torch.nn.Module()
            self.decoder.layers = torch.nn.ModuleList()
            self.extra = torch.nn.Parameter(torch.zeros(1))

    arch = arch_from_hf_dict(BASE | {"model_type": "llama"})
    with pytest.raises(ValueError, match=r"'extra' has no HF name in the llama family's mapping "
                                         r"\(metaapo_nemo/models/families/llama.py\)"):
        list(megatron_param_sources(Chunk(), arch))


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_each_family_knows_the_full_shape_of_every_tensor_it_streams(arch_name, request):
    """What a rank that does not own a tensor allocates to receive it (export and refit under PP
    and EP) comes from the family file: every name of the stream, against the HF checkpoint."""
    from safetensors.torch import load_file

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import _hf_order

    path = request.getfixturevalue(f"tiny_{arch_name}")
    arch = load_arch(path)
    state = load_file(str(path / "model.safetensors"))
    family = family_of(arch.model_type)
    names = _hf_order(arch)
    assert names and set(names) <= set(state)
    for name in names:
        assert family.hf_shape(name, arch) == tuple(state[name].shape), name
    with pytest.raises(KeyError, match=rf"families/{arch.model_type}\.py"):
        family.hf_shape("model.layers.0.mlp.shared_expert.up_proj.weight", arch)
