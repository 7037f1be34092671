"""Single-process checks of the parallel path: Megatron-Core version, CPU config facts,
sequence-parallel refusal, recompute, reference offload, pair adjacency, layout errors.

The multi-process equalities (TP/PP/VPP/DP and the memory options against TP=1) are in
`test_layouts.py`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from metaapo_nemo.models.arch import load_arch
from metaapo_nemo.models.megatron_model import BuildOptions, build_gpt_chunks, causal_mask
from metaapo_nemo.parallel import compat
from metaapo_nemo.parallel.dims import ParallelDims
from tests.dist_utils import REPO, worker_env

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)

# ------------------------------------------------------------------ Megatron-Core versions


def test_ci_runs_the_pinned_megatron_core_and_compat_reports_it():
    """Each tier runs the megatron-core its constraints file pins (CPU: constraints.txt on
    Python 3.11; the H100 stack: constraints-gpu.txt on 3.12), and compat reports it."""
    import importlib.metadata
    import sys

    from tests.test_constraints import CPU, GPU, read_pins

    pinned = read_pins(GPU if sys.version_info[:2] == (3, 12) else CPU)["megatron-core"][0]
    info = compat.info()
    assert importlib.metadata.version("megatron-core") == info.version == str(pinned)
    assert info.version_tuple == pinned.release and info.series in compat.TESTED_SERIES
    assert compat.MIN_VERSION <= info.series <= compat.NEWEST_KNOWN
    # the API variants both series expose
    assert info.gpt_has_vp_stage and info.init_has_gloo_flag and info.finalize_has_pg_collection
    assert compat.gpt_model_kwargs(1) == {"vp_stage": 1}
    assert f"megatron-core {pinned}" in info.describe()


def test_version_parsing_and_support_window(monkeypatch):
    assert compat.parse_version("0.16.1") == (0, 16, 1)
    assert compat.parse_version("0.19.0rc2") == (0, 19, 0)
    assert compat.parse_version("0.17.0.dev0") == (0, 17, 0)
    real = compat.info()
    old = dataclasses.replace(real, version="0.15.3", version_tuple=(0, 15, 3))
    monkeypatch.setattr(compat, "info", lambda: old)
    with pytest.raises(RuntimeError, match=r"0\.15\.3.*too old; install megatron-core>=0\.16"):
        compat.check_supported()
    new = dataclasses.replace(real, version="0.21.0", version_tuple=(0, 21, 0))
    monkeypatch.setattr(compat, "info", lambda: new)
    with pytest.warns(UserWarning, match="newer than any release"):
        compat.check_supported()


def test_optimizer_step_result_shapes():
    class Opt:
        def __init__(self, out):
            self.out = out

        def step(self):
            return self.out

    assert compat.optimizer_step(Opt((True, 2.5, 0))) == (True, 2.5)
    assert compat.optimizer_step(Opt((False, None, None))) == (False, None)
    assert compat.optimizer_step(Opt(True)) == (True, None)


# ------------------------------------------------------------------ CPU config facts


def _with_dims(ctx, **dims):
    return dataclasses.replace(ctx, dims=dataclasses.replace(ctx.dims, **dims))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU config")
def test_cpu_config_uses_unbatched_p2p_for_interleaved_pp(single_ctx, tiny_llama):
    """Batched p2p with VPP gave wrong gradients on gloo; the CPU config must not use it.

    (The PP2 x VPP2 layout test then shows the interleaved schedule equals PP=1.)
    """
    from metaapo_nemo.models.megatron_model import transformer_config

    arch = dataclasses.replace(load_arch(tiny_llama), num_layers=4)
    ctx = _with_dims(single_ctx, world_size=2, pp=2, vpp=2)
    cfg = transformer_config(arch, ctx, BuildOptions())
    assert cfg.virtual_pipeline_model_parallel_size == 2
    assert cfg.batch_p2p_comm is False and cfg.batch_p2p_sync is False
    assert cfg.use_cpu_initialization and not cfg.gradient_accumulation_fusion


def test_sequence_parallel_runs_on_the_local_spec_with_its_norms_marked_for_the_tp_reduce(single_ctx, tiny_llama):
    """The local spec's norms (every layer's, Qwen3's q/k norms and the final one) are plain torch
    norms whose weights megatron's finalize_model_grads all-reduces over TP under sequence
    parallelism (`layer_spec.TorchNorm`); megatron's own wrapper refuses SP. Training under SP
    equals one process in tests/test_layouts.py (tp2_sp, the Qwen3-MoE TP2 layouts)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from metaapo_nemo.models.layer_spec import SpecChoice, TorchNorm, _torch_norm_class, layer_spec
    from metaapo_nemo.models.megatron_model import transformer_config

    ctx = _with_dims(single_ctx, world_size=2, tp=2)
    assert transformer_config(load_arch(tiny_llama), ctx, BuildOptions(sequence_parallel=True)).sequence_parallel
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
                            sequence_parallel=True, tensor_model_parallel_size=2)
    norm = TorchNorm(cfg, 64, eps=1e-6)
    assert isinstance(norm, torch.nn.RMSNorm) and norm.weight.sequence_parallel and norm.eps == 1e-6
    spec = layer_spec(SpecChoice("local"), qk_layernorm=True)
    sub = spec.submodules
    assert sub.input_layernorm is TorchNorm and sub.pre_mlp_layernorm is TorchNorm
    assert sub.self_attention.submodules.q_layernorm is TorchNorm
    assert sub.self_attention.submodules.k_layernorm is TorchNorm
    assert _torch_norm_class() is not TorchNorm
    with pytest.raises(ValueError, match="the local spec's norm supports"):
        TorchNorm(TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, normalization="L2Norm"), 64)


def test_tp_shards_carry_megatron_tp_attributes(single_ctx, tiny_llama):
    """Weights loaded (not initialised) by megatron must still say they are TP-sharded,
    or the optimiser's grad norm ignores TP rank > 0 (wrong clipping under TP)."""
    chunk = build_gpt_chunks(load_arch(tiny_llama), single_ctx, BuildOptions())[0]
    dims = {n: (p.partition_dim, p.partition_stride) for n, p in chunk.named_parameters()
            if getattr(p, "tensor_model_parallel", False)}
    assert dims["embedding.word_embeddings.weight"] == (0, 1)
    assert dims["output_layer.weight"] == (0, 1)
    assert dims["decoder.layers.0.self_attention.linear_qkv.weight"] == (0, 1)
    assert dims["decoder.layers.0.self_attention.linear_proj.weight"] == (1, 1)
    assert dims["decoder.layers.0.mlp.linear_fc1.weight"] == (0, 2)
    assert dims["decoder.layers.0.mlp.linear_fc2.weight"] == (1, 1)
    assert "decoder.layers.0.input_layernorm.weight" not in dims


# ------------------------------------------------------------------ activation recompute


@pytest.mark.filterwarnings("ignore:If you are using transformer_engine:UserWarning")
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_recomputes_and_keeps_gradients(mode, single_ctx, tiny_llama, monkeypatch):
    from megatron.core import tensor_parallel

    from metaapo_nemo.models.convert import load_hf_weights
    from metaapo_nemo.models.logprobs import token_logprobs

    arch = load_arch(tiny_llama)
    torch.manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (2, 24))
    pos = torch.arange(24).expand(2, 24)

    def grads(recompute):
        chunk = build_gpt_chunks(arch, single_ctx, BuildOptions(recompute=recompute))[0]
        load_hf_weights([chunk], tiny_llama, arch, single_ctx)
        chunk.train()
        logits = chunk(ids, pos, causal_mask(24, ids.device))
        token_logprobs(logits[:, :-1], ids[:, 1:], arch.vocab_size, single_ctx).sum().backward()
        return {n: p.grad.clone() for n, p in chunk.named_parameters()}

    plain = grads(None)
    calls = []
    real = tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    again = grads(mode)
    assert len(calls) == arch.num_layers  # one checkpointed region per layer
    assert plain.keys() == again.keys()
    for name in plain:
        torch.testing.assert_close(again[name], plain[name], rtol=0, atol=1e-7, msg=name)


def test_recompute_config_key_validates():
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.config.schema import ConfigError

    assert load_config(None).parallel.recompute is None
    assert load_config(None, ["parallel.recompute=full"]).parallel.recompute == "full"
    with pytest.raises(ConfigError, match="recompute"):
        load_config(None, ["parallel.recompute=everything"])


# ------------------------------------------------------------------ reference offload


def test_reference_on_device_moves_and_always_moves_back():
    from metaapo_nemo.trainer.preference import reference_on_device

    class Ref:
        def __init__(self):
            self.moves = []

        def offload(self, device):
            self.moves.append(str(device))

    ref = Ref()
    with reference_on_device(ref, torch.device("cuda", 0), offload=False):
        pass
    assert ref.moves == []
    with pytest.raises(KeyError):
        with reference_on_device(ref, torch.device("cuda", 0), offload=True):
            assert ref.moves == ["cuda:0"]
            raise KeyError("failure while the reference is in use")
    assert ref.moves == ["cuda:0", "cpu"]


@pytest.mark.parametrize("precompute", [False, True])
def test_recipe_offloads_reference_between_uses(precompute, tmp_path, monkeypatch):
    """The recipe parks the reference on the CPU after setup and around every use."""
    from metaapo_nemo import run as R
    from metaapo_nemo.models.policy import MegatronLM

    moves = []
    real = MegatronLM.offload
    monkeypatch.setattr(MegatronLM, "offload",
                        lambda self, d: moves.append(str(d)) or real(self, d))
    args = [f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}",
            "train.progress_bar=off", "train.max_steps=2", "train.save_final_hf=false",
            "data.limit=32", "reference.offload_to_cpu=true",
            f"reference.precompute={str(precompute).lower()}"]
    assert R.main(args, method="dpo") == 0
    uses = 1 if precompute else 2
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # on CPU both moves are no-ops
    assert moves == ["cpu"] + [device, "cpu"] * uses


def test_metaapo_offloads_reference_between_uses(tmp_path, monkeypatch):
    """MetaAPO honours reference.offload_to_cpu like DPO (one FrozenReference for every
    method): parked on the CPU after setup, brought over for each round's margin pass and
    each step's online-pair pass, parked again after each."""
    from metaapo_nemo import run as R
    from metaapo_nemo.models.policy import MegatronLM
    from tests.dist_utils import ROLLOUT

    moves = []
    real = MegatronLM.offload
    monkeypatch.setattr(MegatronLM, "offload", lambda self, d: moves.append(str(d)) or real(self, d))
    args = [f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}", "train.progress_bar=off",
            "train.save_final_hf=false", "data.limit=16", "metaapo.round_size=8", "train.max_steps=2",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "metaapo.sampling=all",
            "reference.offload_to_cpu=true", *ROLLOUT]
    assert R.main(args, method="metaapo") == 0
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    # 2 rounds x (margin pass + 1 step with online pairs) = 4 uses
    assert moves == ["cpu"] + [device, "cpu"] * 4


# ------------------------------------------------------------------ batching


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("micro", [1, 2])
def test_pairs_stay_together_across_dp_shards_and_micro_batches(dp, micro):
    from metaapo_nemo.data.preference import TokenizedPair
    from metaapo_nemo.trainer.batching import StepPlan, rank_microbatches

    batch = [TokenizedPair(index=100 + i, prompt_ids=(1, 2 + i),
                           chosen_ids=(50 + i, 7) * (i % 3 + 1), rejected_ids=(80 + i,))
             for i in range(8)]
    plan = StepPlan(global_batch=8, micro_batch=micro, dp_size=dp)
    seen = []
    for rank in range(dp):
        for mb in rank_microbatches(batch, plan, rank, pad_id=0, device=torch.device("cpu")):
            assert mb.input_ids_NT.shape[0] == 2 * micro
            for j, idx in enumerate(mb.extras["pair_index"].tolist()):
                pair = batch[idx - 100]
                n_p = len(pair.prompt_ids)
                chosen, rejected = mb.input_ids_NT[2 * j], mb.input_ids_NT[2 * j + 1]
                assert chosen[:n_p].tolist() == rejected[:n_p].tolist() == list(pair.prompt_ids)
                n_c, n_r = len(pair.chosen_ids), len(pair.rejected_ids)
                assert chosen[n_p:n_p + n_c].tolist() == list(pair.chosen_ids)
                assert rejected[n_p:n_p + n_r].tolist() == list(pair.rejected_ids)
                seen.append(idx)
    assert seen == [p.index for p in batch]  # every pair exactly once, contiguous per rank


# ------------------------------------------------------------------ layout errors


def test_recipe_refuses_impossible_layout_before_building_anything(tmp_path):
    """`recipes/dpo.py parallel.tp=3` on one process: exit 2 with the arithmetic."""
    out = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "recipes" / "dpo.py"), "parallel.tp=3",
           f"run.output_dir={out}", f"run.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "parallel.tp=3 does not divide model.num_attention_heads=4 (4 / 3 = 1.33333)" in err
    assert "parallel.tp=3 does not divide model.num_key_value_heads=2" in err
    assert ("world_size=1 is not divisible by parallel.tp=3 x parallel.pp=1 x parallel.cp=1 = 3; "
            "use a world size of 3") in err
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "cache").exists()  # no model, no run dir


def test_layout_errors_list_valid_alternatives():
    dims = ParallelDims(world_size=8, tp=3, pp=3)
    with pytest.raises(ValueError) as exc:
        dims.validate(num_layers=4, num_attention_heads=4, num_kv_heads=2)
    msg = str(exc.value)
    assert "parallel.tp=3 does not divide model.num_attention_heads=4" in msg
    assert "use 1 or 2" in msg
    assert "parallel.pp=3 does not divide model.num_layers=4" in msg
    assert "world_size=8 is not divisible by parallel.tp=3 x parallel.pp=3 x parallel.cp=1 = 9" \
        in msg


def test_benchmark_logits_arithmetic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_parallel_step",
                                                  REPO / "benchmarks" / "parallel_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    line = bench.logits_bytes(vocab=128256, tp=8, rows=8, seq=4096)
    assert line["full_BTV_bytes"] == 8 * 4096 * 128256 * 4
    assert line["per_rank_BTv_bytes"] == 8 * 4096 * 16032 * 4
    assert line["not_materialised_bytes"] == line["full_BTV_bytes"] * 7 // 8
    padded = bench.logits_bytes(vocab=131, tp=2, rows=1, seq=1)  # 131 -> 132: 66 per rank
    assert padded["per_rank_BTv_bytes"] == 66 * 4


def test_mixture_of_experts_layouts_megatron_cannot_run_are_refused_at_start_up():
    """MoE + TP needs sequence parallelism (megatron raises mid-training otherwise), MoE + CP is
    not weighted yet, expert parallelism needs experts it divides and must
    divide dp x cp; all named before anything is built."""
    from metaapo_nemo.config import load_config
    from metaapo_nemo.config.checks import check_layout
    from metaapo_nemo.config.schema import ConfigError

    moe = {"num_layers": 4, "num_attention_heads": 4, "num_kv_heads": 2, "num_experts": 4}
    with pytest.raises(ConfigError, match=r"parallel.tp=2 with a mixture-of-experts model \(4 experts\) needs "
                                          r"parallel.sequence_parallel=true"):
        check_layout(load_config(None, ["parallel.tp=2"], method="dpo"), 2, moe)
    thd = ["train.batching=pack", "train.pack_format=thd", "train.share_prompt=false"]
    with pytest.raises(ConfigError, match=r"parallel.cp=2 with a mixture-of-experts model"):
        check_layout(load_config(None, ["parallel.cp=2", *thd], method="dpo"), 2, moe)
    assert check_layout(load_config(None, ["parallel.pp=2"], method="dpo"), 2, moe).pp == 2
    with pytest.raises(ConfigError, match=r"parallel.ep=2: .* has none \(a dense model\); set parallel.ep=1"):
        check_layout(load_config(None, ["parallel.ep=2"], method="dpo"), 2, moe | {"num_experts": 0})
    with pytest.raises(ConfigError, match=r"has 3 experts, not a multiple of 2"):
        check_layout(load_config(None, ["parallel.ep=2"], method="dpo"), 2, moe | {"num_experts": 3})
    with pytest.raises(ConfigError, match=r"ep=4 does not divide data-parallel x context-parallel size dp 2"):
        check_layout(load_config(None, ["parallel.ep=4"], method="dpo"), 2, moe)
    assert check_layout(load_config(None, ["parallel.ep=2"], method="dpo"), 2, moe).ep == 2
    assert check_layout(load_config(None, ["parallel.tp=2"], method="dpo"), 2, moe | {"num_experts": 0}).tp == 2
