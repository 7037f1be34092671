"""The byte formulas of the memory plan (the package docstring states them)."""

from __future__ import annotations

from metaapo_nemo.models.arch import FUSED_PROJECTIONS, ModelArch, projection_shapes
from metaapo_nemo.planner.records import _BYTES, GiB, PlanInput


def layer_params(arch: ModelArch) -> int:
    return arch.layer_parameters


def expert_params_per_rank(arch: ModelArch, tp: int, pp: int, ep: int = 1) -> int:
    """The experts' share of `params_per_rank`: each rank holds num_experts / ep of them, split by TP."""
    return -(-arch.num_layers // pp) * arch.expert_parameters // (ep * tp)


def params_per_rank(arch: ModelArch, tp: int, pp: int, ep: int = 1) -> int:
    """Parameters on the heaviest pipeline stage of one TP rank (of one expert-parallel rank)."""
    experts = expert_params_per_rank(arch, tp, pp, 1)
    layers = -(-arch.num_layers // pp) * layer_params(arch) // tp - experts + expert_params_per_rank(arch, tp, pp, ep)
    vocab = -(-arch.vocab_size // tp) * arch.hidden_size
    first = layers + vocab
    last = layers + arch.hidden_size + (vocab if (pp > 1 or not arch.tie_word_embeddings) else 0)
    if pp == 1:
        return layers + vocab + arch.hidden_size + (0 if arch.tie_word_embeddings else vocab)
    return max(first, last)


def lora_params_per_rank(arch: ModelArch, tp: int, pp: int, rank: int, targets: tuple[str, ...]) -> int:
    """Adapter parameters on the heaviest pipeline stage of one TP rank: per targeted projection
    (in -> out) A [r, in] and B [out, r], the column-parallel ones' B and the row-parallel ones' A
    split over TP (models/lora.py)."""
    if not rank:
        return 0
    shapes = projection_shapes(arch.hidden_size, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim,
                               arch.intermediate_size)
    row = {"o_proj", "down_proj"}
    per_layer = sum(rank * (shapes[t][0] // tp + shapes[t][1]) if t in row else rank * (shapes[t][0] + shapes[t][1] // tp)
                    for t in targets)
    return -(-arch.num_layers // pp) * per_layer


def lora_merged_params_per_rank(arch: ModelArch, tp: int, pp: int, targets: tuple[str, ...]) -> int:
    """Weights of the adapted linears on the heaviest pipeline stage of one TP rank: what
    ``lora.compute=merged`` copies (W + s B A) for a schedule. A fused linear (qkv, gate_up) is merged
    whole when any of its projections is targeted (models/lora_merged.py)."""
    shapes = projection_shapes(arch.hidden_size, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim,
                               arch.intermediate_size)
    per_layer = sum(sum(shapes[p][0] * shapes[p][1] for p in parts) // tp
                    for parts in FUSED_PROJECTIONS if any(p in targets for p in parts))
    return -(-arch.num_layers // pp) * per_layer


def activation_bytes_per_layer(arch: ModelArch, seq: int, rows: int, tp: int, recompute: str | None,
                               sequence_parallel: bool = False) -> float:
    """bf16 bytes of one layer's saved activations for one micro-batch on one TP rank (with
    sequence parallelism the replicated 10 s b h, and a full-recompute layer input, are split
    over TP too)."""
    s, b, h, a = seq, rows, arch.hidden_size, arch.num_attention_heads
    sp = tp if sequence_parallel else 1
    if recompute == "full":
        return 2.0 * s * b * h / sp
    per = s * b * h * (10.0 / sp + 24.0 / tp)
    if recompute != "selective":
        per += s * b * h * 5.0 * a * s / (h * tp)
    if arch.num_experts:  # the MoE MLP instead of the dense one (its 16 s b h / t share)
        k, i = arch.experts_per_token, arch.moe_intermediate_size
        per += s * b * (k * (2.0 * h + 6.0 * i / tp) + 4.0 * arch.num_experts - 16.0 * h / tp)
    return per


def moe_dispatch_bytes(arch: ModelArch, seq: int, rows: int, dtype_bytes: int) -> float:
    """Transient working set of one MoE layer's token dispatch (0 for a dense model): the k routed
    copies of each token before and after the all-to-all (2 s b k h in the training dtype, an
    even spread over the expert-parallel ranks assumed; megatron is dropless, so a skewed router
    sends more to one rank), and the router's fp32 logits and probabilities and its boolean
    routing map (s b E x 9 B). The backward holds the same for the gradients, one layer at a time."""
    if not arch.num_experts:
        return 0.0
    s, b = seq, rows
    return s * b * (2.0 * arch.experts_per_token * arch.hidden_size * dtype_bytes + 9.0 * arch.num_experts)


def nccl_communicators(x: PlanInput) -> tuple[int, int]:
    """(Megatron's, vLLM's) NCCL communicators on one rank."""
    train = (int(x.tp > 1) + int(x.dp > 1) + int(x.cp > 1) + int(x.ep > 1) + int(x.world > 1)
             + (2 if x.pp > 1 else 0))
    return train, int((x.rollout or x.eval_engine) and x.vllm_tp > 1)


def vllm_profile_reserve_bytes(x: PlanInput) -> dict[str, float]:
    """What vLLM's start-up profiling takes out of util x GPU before sizing its KV cache."""
    a = x.arch
    t = x.vllm_max_num_batched_tokens
    if a.num_experts:  # fused MoE's workspaces: (T, k, 2I), (T k, I), (T, k, h); fp32 router logits
        k, i = a.experts_per_token, a.moe_intermediate_size
        forward = t * (k * (3 * i / x.vllm_tp + a.hidden_size) + 4 * a.hidden_size) * 2.0 + t * a.num_experts * 4.0
    else:
        forward = t * (3 * a.intermediate_size / x.vllm_tp + 4 * a.hidden_size) * 2.0
    return {
        "forward": forward,
        "sampler": 3.0 * x.vllm_max_num_seqs * a.vocab_size * 4,
        "cudagraphs": 0.0 if x.vllm_enforce_eager else x.vllm_cudagraph_gib * GiB,
        "nccl": nccl_communicators(x)[1] * x.nccl_gib_per_comm * GiB,
    }


def kv_bytes_per_token(arch: ModelArch, vllm_tp: int) -> float:
    """bf16 K and V of every layer for one token on one vLLM TP rank."""
    kv_heads = max(1, arch.num_kv_heads // vllm_tp)
    return 2.0 * arch.num_layers * kv_heads * arch.head_dim * 2


def reward_parameters(arch: ModelArch) -> int:
    """Parameters of a sequence-classification reward model on `arch`: the decoder and a
    scalar head (h x 1) in place of the LM head (an untied one is not in the checkpoint)."""
    lm_head = 0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size
    return arch.num_parameters - lm_head + arch.hidden_size


def reward_activation_bytes(x: PlanInput) -> float:
    """Working set of one no-grad RM forward (transformers, SDPA attention: no s x s scores):
    b x s tokens each holding the residual and the normed input (2h), q, k, v (h + 2 kv hd)
    and the SwiGLU MLP's gate, up and their product (3I), in the RM's dtype, plus the 4-D
    boolean attention mask transformers builds for a padded batch (b x s x s bytes)."""
    a = x.reward_arch
    if a is None:
        return 0.0
    s = x.reward_seq_length or x.seq_length
    per_token = 3 * a.hidden_size + 2 * a.num_kv_heads * a.head_dim + 3 * a.intermediate_size
    padding_mask = float(x.reward_batch_size) * s * s  # transformers' 4-D boolean mask of a padded batch
    return float(x.reward_batch_size) * s * per_token * _BYTES[x.reward_dtype] + padding_mask


def chunk_prompts(x: PlanInput) -> int:
    """Prompts per chunk of a round's generation and scoring (metaapo.prompts_per_chunk):
    the unit every gather moves."""
    if x.prompts_per_chunk <= 0:
        return x.round_prompts
    return min(x.prompts_per_chunk, x.round_prompts)


def pairs_gather_bytes(x: PlanInput) -> float:
    """GPU staging of the trainer's all_gather_object of one chunk's pairs: (world + 1) x max."""
    if x.round_prompts <= 0 or x.world == 1:
        return 0.0
    per_rank = -(-chunk_prompts(x) // x.world) * 2 * x.max_new_tokens * x.pickle_bytes_per_token
    return (x.world + 1) * per_rank


def samples_gather_host_bytes(x: PlanInput) -> float:
    """Host staging of RolloutGroup.generate's gather of one chunk (gloo): (world + 1) x one
    engine's pickled samples."""
    if x.round_prompts <= 0 or x.world == 1:
        return 0.0
    engines = max(1, x.world // x.vllm_tp)
    per_engine = -(-chunk_prompts(x) // engines) * x.samples_per_prompt * x.max_new_tokens
    return (x.world + 1) * per_engine * x.pickle_bytes_per_token


def checkpoint_bytes(arch: ModelArch, dtype: str, with_reference: bool) -> float:
    """Bytes of one checkpoint: weights + fp32 master + Adam m, v (+ the moving reference)."""
    w = _BYTES["bfloat16" if dtype == "fp8" else dtype]
    per_param = w + 12 + (w if with_reference else 0)
    return float(arch.num_parameters) * per_param
