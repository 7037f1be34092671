"""Layer-spec selection and FP8 settings (no GPU needed to check the choices)."""

from __future__ import annotations

import pytest

from metaapo_nemo.models.convert import _hf_order
from metaapo_nemo.models.families import FAMILIES
from metaapo_nemo.models.layer_spec import SpecChoice, fp8_kwargs, select_impl


def test_auto_picks_te_only_with_cuda_and_te():
    assert select_impl("auto", None, "bfloat16", cuda=True, te=True).impl == "transformer_engine"
    assert select_impl("auto", None, "bfloat16", cuda=True, te=False).impl == "local"
    assert select_impl("auto", None, "float32", cuda=False, te=False).impl == "local"


def test_te_without_cuda_or_te_is_a_clear_error():
    with pytest.raises(ValueError, match="needs CUDA and transformer_engine"):
        select_impl("transformer_engine", None, "bfloat16", cuda=False, te=False)
    with pytest.raises(ValueError, match="needs transformer_engine"):
        select_impl("transformer_engine", None, "bfloat16", cuda=True, te=False)


def test_fp8_settings_hybrid_delayed_and_current_scaling():
    c = select_impl("transformer_engine", "hybrid", "bfloat16", cuda=True, te=True)
    assert fp8_kwargs(c) == {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_amax_history_len": 1024,
                             "fp8_amax_compute_algo": "max"}
    c2 = select_impl("transformer_engine", "e4m3", "bfloat16", cuda=True, te=True, fp8_recipe="tensorwise")
    assert fp8_kwargs(c2) == {"fp8": "e4m3", "fp8_recipe": "tensorwise"}
    assert fp8_kwargs(SpecChoice("local")) == {}


def test_fp8_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="needs the Transformer Engine spec"):
        select_impl("local", "hybrid", "bfloat16", cuda=True, te=True)
    with pytest.raises(ValueError, match="model.dtype=bfloat16"):
        select_impl("transformer_engine", "hybrid", "float32", cuda=True, te=True)
    with pytest.raises(ValueError, match="model.fp8_recipe"):
        select_impl("transformer_engine", "hybrid", "bfloat16", cuda=True, te=True, fp8_recipe="mxfp9")


def test_converter_maps_te_fused_norm_names():
    for family in FAMILIES.values():
        assert family.layer["self_attention.linear_qkv.layer_norm_weight"][1] == ("input_layernorm.weight",)
        if family.moe:  # the TE MoE layer keeps a separate pre-MLP norm (no dense fc1 to fuse it into)
            assert "mlp.linear_fc1.layer_norm_weight" not in family.layer
            assert family.layer["pre_mlp_layernorm.weight"][1] == ("post_attention_layernorm.weight",)
        else:
            assert family.layer["mlp.linear_fc1.layer_norm_weight"][1] == ("post_attention_layernorm.weight",)


def test_hf_order_has_no_duplicates():
    from metaapo_nemo.models.arch import arch_from_hf_dict

    arch = arch_from_hf_dict(dict(model_type="llama", vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32))
    order = _hf_order(arch)
    assert len(order) == len(set(order)) == 1 + 2 * 9 + 2
