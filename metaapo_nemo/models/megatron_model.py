"""Builds Megatron-Core `GPTModel`s for an HF architecture (`ModelArch`).

Local (plain PyTorch) layer spec on CPU; the Transformer Engine spec is selected by the
scale-out issue on GPU. One model chunk per virtual pipeline stage. Weights are NOT
initialised here (`perform_initialization=False`): they are loaded from the HF checkpoint
by `metaapo_nemo.models.convert`.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from metaapo_nemo.models.arch import ModelArch
from metaapo_nemo.models.layer_spec import SpecChoice, fp8_kwargs, layer_spec, select_impl, te_available
from metaapo_nemo.parallel import compat
from metaapo_nemo.parallel.state import ParallelContext

if TYPE_CHECKING:
    from metaapo_nemo.models.lora import LoraSettings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BuildOptions:
    """Training-side knobs of the Megatron model that do not come from the checkpoint."""

    dtype: str = "float32"
    recompute: str | None = None  # None | "selective" | "full"
    sequence_parallel: bool = False
    # RoPE at explicit per-token positions (shared-prompt and packed rows): megatron's
    # 'rope' path ignores position_ids, its 'mrope' path with one section spanning every
    # rotary channel is ordinary RoPE at the given positions (see `explicit_positions`).
    explicit_positions: bool = False
    # Packed rows go to the model as THD `PackedSeqParams` (models/packed_seq.py): no mask,
    # RoPE restarts at each sequence's cu_seqlens offset.
    packed_thd: bool = False
    attention: str = "megatron"  # local spec core attention: "megatron" | "sdpa"
    transformer_impl: str = "auto"  # auto | local | transformer_engine (see layer_spec.py)
    fp8: str | None = None  # None | hybrid | e4m3 (TE only)
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    # LoRA adapters on the linears, the base frozen (models/lora.py); None: full training
    lora: LoraSettings | None = None

    def spec_choice(self, on_gpu: bool) -> SpecChoice:
        return select_impl(self.transformer_impl, self.fp8, self.dtype, cuda=on_gpu, te=te_available(),
                           fp8_recipe=self.fp8_recipe, fp8_amax_history_len=self.fp8_amax_history_len,
                           fp8_amax_compute_algo=self.fp8_amax_compute_algo)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to a multiple of TP (each rank holds an equal slice).

    The extra rows are zero in the embedding and masked to -inf before any softmax
    (see `metaapo_nemo.models.logprobs`), so padding never changes log-probs or exports.
    """
    return -(-vocab_size // tp) * tp


# The CUDA extensions megatron's FusedScaleMaskSoftmax imports (fused_softmax.py). They are
# built by Megatron-LM's setup or the NGC container, NOT shipped in the megatron-core wheel.
FUSED_SOFTMAX_KERNELS = (
    "scaled_masked_softmax_cuda",
    "scaled_upper_triang_masked_softmax_cuda",
    "scaled_softmax_cuda",
)


@functools.lru_cache(maxsize=1)
def fused_softmax_available() -> bool:
    """Whether every fused-softmax kernel megatron may pick imports on this machine."""
    for name in FUSED_SOFTMAX_KERNELS:
        try:
            importlib.import_module(name)
        except (ImportError, OSError):  # absent, or built against another torch / driver
            return False
    return True


def transformer_config(arch: ModelArch, ctx: ParallelContext, opts: BuildOptions):
    """The TransformerConfig equivalent of an HF Llama/Qwen2/Mistral config."""
    from megatron.core.transformer import TransformerConfig

    on_cpu = ctx.device.type == "cpu"
    dtype = _DTYPES[opts.dtype]
    recompute = {}
    if opts.recompute == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif opts.recompute == "selective":
        recompute = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=ctx.dims.tp,
        pipeline_model_parallel_size=ctx.dims.pp,
        virtual_pipeline_model_parallel_size=ctx.dims.vpp,
        context_parallel_size=ctx.dims.cp,
        # the linears read these, not parallel_state: an expert's weights are reduced over the
        # expert-data-parallel ranks only when the config says experts are split
        expert_model_parallel_size=ctx.dims.ep,
        expert_tensor_parallel_size=ctx.dims.tp if arch.num_experts else None,
        sequence_parallel=opts.sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,
        # Fusions need CUDA kernels; off on CPU (measured: notes/megatron-on-cpu.md). The
        # local spec's fused softmax only where its kernel imports (the wheel has none).
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=not on_cpu and fused_softmax_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        # Batched p2p with interleaved PP gave wrong gradients on gloo; unbatched is exact.
        batch_p2p_comm=not on_cpu,
        batch_p2p_sync=not on_cpu,
        # The loss normalises by the global pair count itself (see PolicyModel).
        calculate_per_token_loss=True,
        # One mrope section covering all head_dim / 2 rotary frequencies: the first row of
        # the [3, B, S] position ids drives every channel (the other two sections are empty).
        mrope_section=[arch.head_dim // 2, 0, 0] if opts.explicit_positions else None,
        **recompute,
        **fp8_kwargs(opts.spec_choice(on_gpu=not on_cpu)),
        **moe_kwargs(arch, opts.spec_choice(on_gpu=not on_cpu).impl),
    )


def moe_kwargs(arch: ModelArch, impl: str) -> dict:
    """TransformerConfig fields of a mixture-of-experts model ({} for a dense one).

    Routing as HF's Qwen3-MoE: softmax over the experts, top k; ``norm_topk_prob`` renormalises
    the k weights, which is megatron's top-k-then-softmax (``moe_router_pre_softmax=False``);
    without it, softmax-then-top-k (``pre_softmax=True``). Dropless (no capacity factor), the
    router in fp32 (the TE spec), the load-balancing loss at the checkpoint's ``router_aux_loss_coef`` (its
    per-micro-batch weight is set per step: `MegatronLM.run`). Tokens move by all-to-all
    (gloo has no reduce-scatter for the all-gather dispatcher); expert tensor parallel = TP.
    """
    if not arch.num_experts:
        return {}
    return dict(
        num_moe_experts=arch.num_experts, moe_router_topk=arch.experts_per_token,
        moe_ffn_hidden_size=arch.moe_intermediate_size, moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.norm_topk_prob, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=arch.router_aux_loss_coef,
        # fp32 router logits on the TE spec (bf16 training); megatron's fp32 router GEMM needs
        # TE (0.16 raises NameError without it), and the CPU trains in fp32 anyway
        moe_router_dtype="fp32" if impl == "transformer_engine" else None,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=impl == "transformer_engine",
    )


def build_gpt_chunks(arch: ModelArch, ctx: ParallelContext, opts: BuildOptions) -> list:
    """One GPTModel per virtual pipeline stage of this rank (a list of length vpp or 1)."""
    from megatron.core.models.gpt import GPTModel

    if arch.rope_scaling is not None:
        rs = arch.rope_scaling
        if (rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) != (1.0, 4.0, 8192):
            raise ValueError(
                f"llama3 RoPE scaling with low/high freq factors {rs.low_freq_factor}/"
                f"{rs.high_freq_factor} and original length {rs.original_max_position_embeddings} "
                "is not supported by megatron-core (it fixes 1/4/8192)"
            )
    config = transformer_config(arch, ctx, opts)
    choice = opts.spec_choice(on_gpu=ctx.device.type == "cuda")
    spec = layer_spec(choice, qk_layernorm=arch.qk_norm, num_experts=arch.num_experts)
    if opts.attention == "sdpa" and choice.impl == "local":
        from metaapo_nemo.models.attention import use_sdpa_core

        use_sdpa_core(spec)
    vpp = ctx.dims.vpp or 1
    chunks = []
    for vp_stage in range(vpp):
        first = ctx.is_first_stage and vp_stage == 0
        last = ctx.is_last_stage and vp_stage == vpp - 1
        model = GPTModel(
            config=config,
            transformer_layer_spec=_block_spec(spec, config, vp_stage if ctx.dims.vpp else None, choice.impl),
            vocab_size=padded_vocab_size(arch.vocab_size, ctx.dims.tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=first,
            post_process=last,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="mrope" if opts.explicit_positions else "rope",
            rotary_base=arch.rope_theta,  # type: ignore[arg-type]  (float bases are valid)
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
            **compat.gpt_model_kwargs(vp_stage if ctx.dims.vpp else None),
        )
        _mark_tensor_parallel_weights(model, config.gated_linear_unit)
        if ctx.device.type != "cuda":
            _cpu_moe(model)
        if opts.explicit_positions:
            _use_rope_frequencies(model, arch)
        model.to(ctx.device)
        chunks.append(model)
    return chunks


def _block_spec(spec, config, vp_stage: int | None, impl: str):
    """The decoder block of a chunk: on the local spec, its layers and a final norm that runs
    under sequence parallelism (`layer_spec.TorchNorm`; megatron's default for a layer spec is
    its wrapper that refuses it); the Transformer Engine spec's layer spec as it is."""
    if impl != "local":
        return spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from metaapo_nemo.models.layer_spec import TorchNorm

    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=TorchNorm))


def _cpu_moe(model: torch.nn.Module) -> None:
    """Lets megatron's MoE layers run without CUDA.

    `TopKRouter.gating` (megatron-core 0.16 and 0.19) moves a CPU weight to
    ``torch.cuda.current_device()`` and computes the logits with a GEMM that needs Transformer
    Engine (0.16: NameError without it). On the CPU the logits are the same product done by
    torch, in the router dtype; routing, top-k and the load-balancing loss stay megatron's.
    The all-to-all dispatcher synchronises on an event of a side stream it keeps as a CLASS
    attribute, made once by whatever ``torch.cuda.Stream`` is then (another library's CPU stub
    returns no event): each dispatcher gets its own `cpu_compat` null stream instead.
    """
    import types

    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from metaapo_nemo.parallel.cpu_compat import NullStream

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.gating = types.MethodType(gating, module)
        dispatcher = getattr(module, "token_dispatcher", None)
        if isinstance(dispatcher, MoEAlltoAllTokenDispatcher):
            dispatcher.cuda_dtoh_stream = NullStream()


def _mark_tensor_parallel_weights(model: torch.nn.Module, gated: bool) -> None:
    """Sets megatron's TP attributes on weights built with `perform_initialization=False`.

    megatron-core (0.16) sets `tensor_model_parallel` / `partition_dim` / `partition_stride`
    on linear and embedding WEIGHTS only inside its init functions, which we skip (weights
    come from the checkpoint). Without them every TP shard looks like a replica: the
    optimiser's grad norm counts only TP rank 0's shard, so clipping (and the reported
    grad_norm) differ between TP=1 and TP=2. Biases get the attributes either way.
    """
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    for name, module in model.named_modules():
        if isinstance(module, RowParallelLinear):
            dim, stride = 1, 1
        elif isinstance(module, ColumnParallelLinear):
            dim, stride = 0, 2 if gated and name.endswith("linear_fc1") else 1
        elif isinstance(module, VocabParallelEmbedding):
            dim, stride = 0, 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not hasattr(weight, "tensor_model_parallel"):
            weight.tensor_model_parallel = True
            weight.partition_dim = dim
            weight.partition_stride = stride


def _use_rope_frequencies(model: torch.nn.Module, arch: ModelArch) -> None:
    """Gives the mrope module exactly the inverse frequencies of the 'rope' path.

    megatron's `MultimodalRotaryEmbedding` computes plain inverse frequencies and knows no
    llama3 scaling; take them from a `RotaryEmbedding` built with the same arguments, so
    explicit positions give bit-identical angles to the implicit 0..S-1 path.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(
        kv_channels=arch.head_dim, rotary_percent=1.0, rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling is not None,
        rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
        use_cpu_initialization=True,
    )
    old = model.rotary_pos_emb.inv_freq
    model.rotary_pos_emb.inv_freq = rope.inv_freq.to(device=old.device, dtype=old.dtype)


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, S, S] boolean mask, True = masked (the local attention's convention)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
