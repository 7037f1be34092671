"""Per-GPU memory planner for a training layout (plain Python: runs on a login node).

Estimates the peak bytes on the most loaded GPU in the two phases of a MetaAPO round:

- train:    policy weights + gradient buffer + optimiser state + activations (by recompute
            mode, 1F1B in-flight micro-batches) + last-stage logits + reference weights
            (unless offloaded) + vLLM's sleeping footprint.
- generate: policy weights + gradient buffer + optimiser state stay resident (colocated),
            plus vLLM's weights (at its own TP) and its KV cache, plus the reward model.

Formulas (bytes; s = sequence length, b = micro-batch rows, h = hidden, a = heads,
L = layers, t = TP, p = PP, d = DP, V = vocabulary):
- parameters per rank: transformer layers L/p x per-layer/t, plus the embedding (V h / t)
  on the first stage and the output layer (V h / t, unless tied and p == 1) on the last.
- weights: params x bytes(dtype); megatron's DDP keeps fp32 gradient buffers (4 B/param);
  Adam: fp32 m and v (8 B) plus an fp32 master copy when training in bf16 (4 B); the
  distributed optimiser divides the optimiser part (master + m + v) by d.
- activations per layer per micro-batch, bf16 (Korthikanti et al. 2022, TP without
  sequence parallel): s b h (10 + 24/t + 5 a s / (h t)) bytes; selective recompute drops
  the attention-score term 5 a s / (h t); full recompute keeps only each layer's input,
  2 s b h bytes. fp32 training doubles them.
  1F1B holds up to p micro-batches in flight on the first stage, so the first stage holds
  activations of L/p layers x min(p, micro-batches) micro-batches.
- logits on the last stage: s b V / t x 4 B (fp32 for the vocab-parallel cross entropy),
  twice (logits and their gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metaapo_nemo.models.arch import ModelArch

GiB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "fp8": 1}


@dataclass(frozen=True)
class PlanInput:
    arch: ModelArch
    tp: int = 1
    pp: int = 1
    dp: int = 1
    dtype: str = "bfloat16"
    distributed_optimizer: bool = True
    recompute: str | None = None  # None | "selective" | "full"
    seq_length: int = 4096
    micro_batch_rows: int = 4  # rows per micro-batch (2 per DPO pair, 4 per MetaAPO prompt)
    num_microbatches: int = 8
    reference_offloaded: bool = False
    reference_resident: bool = True  # False for reference-free losses (SimPO)
    vllm_tp: int = 1
    vllm_kv_cache_gib: float = 0.0
    vllm_sleep_level: int = 1  # 1: weights offloaded to CPU and KV freed while training
    vllm_overhead_gib: float = 1.0  # CUDA context / allocator reserve
    rollout: bool = True  # False: no vLLM engine (offline DPO), no generate phase
    reward_arch: ModelArch | None = None
    reward_offloaded: bool = True
    gpu_memory_gib: float = 80.0


@dataclass
class Plan:
    per_phase: dict[str, dict[str, float]] = field(default_factory=dict)  # GiB
    params_per_rank: int = 0

    def peak(self, phase: str) -> float:
        return sum(self.per_phase[phase].values())

    @property
    def worst(self) -> tuple[str, float]:
        phase = max(self.per_phase, key=self.peak)
        return phase, self.peak(phase)

    def report(self, gpu_gib: float) -> str:
        lines = [f"memory plan per GPU (most loaded stage; {self.params_per_rank / 1e9:.3f} B params/rank):"]
        for phase, parts in self.per_phase.items():
            body = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v)
            lines.append(f"  {phase:8s} {self.peak(phase):7.2f} GiB = {body}")
        phase, peak = self.worst
        verdict = "fits" if peak <= gpu_gib else "DOES NOT FIT"
        lines.append(f"  peak {peak:.2f} GiB ({phase}) vs {gpu_gib:.0f} GiB per GPU: {verdict}")
        return "\n".join(lines)


def layer_params(arch: ModelArch) -> int:
    h, hd = arch.hidden_size, arch.head_dim
    attn = h * hd * (arch.num_attention_heads + 2 * arch.num_kv_heads) + hd * arch.num_attention_heads * h
    if arch.qkv_bias:
        attn += hd * (arch.num_attention_heads + 2 * arch.num_kv_heads)
    return attn + 3 * h * arch.intermediate_size + 2 * h


def params_per_rank(arch: ModelArch, tp: int, pp: int) -> int:
    """Parameters on the heaviest pipeline stage of one TP rank."""
    layers = -(-arch.num_layers // pp) * layer_params(arch) // tp
    vocab = -(-arch.vocab_size // tp) * arch.hidden_size
    first = layers + vocab
    last = layers + arch.hidden_size + (vocab if (pp > 1 or not arch.tie_word_embeddings) else 0)
    if pp == 1:
        return layers + vocab + arch.hidden_size + (0 if arch.tie_word_embeddings else vocab)
    return max(first, last)


def activation_bytes_per_layer(arch: ModelArch, seq: int, rows: int, tp: int, recompute: str | None) -> float:
    """bf16 bytes of one layer's saved activations for one micro-batch on one TP rank."""
    s, b, h, a = seq, rows, arch.hidden_size, arch.num_attention_heads
    if recompute == "full":
        return 2.0 * s * b * h
    per = s * b * h * (10.0 + 24.0 / tp)
    if recompute != "selective":
        per += s * b * h * 5.0 * a * s / (h * tp)
    return per


def plan_memory(x: PlanInput) -> Plan:
    a = x.arch
    n = params_per_rank(a, x.tp, x.pp)
    wbytes = _BYTES[x.dtype]
    opt_bytes = (8 + (4 if x.dtype != "float32" else 0)) * n
    if x.distributed_optimizer:
        opt_bytes /= x.dp
    in_flight = min(x.pp, x.num_microbatches)
    layers_here = -(-a.num_layers // x.pp)
    acts = activation_bytes_per_layer(a, x.seq_length, x.micro_batch_rows, x.tp, x.recompute)
    acts *= layers_here * in_flight * (wbytes / 2)  # the formula counts bf16 bytes
    logits = 2 * x.seq_length * x.micro_batch_rows * (-(-a.vocab_size // x.tp)) * 4
    reference = 0.0 if (x.reference_offloaded or not x.reference_resident) else n * wbytes
    vllm_weights = a.num_parameters * _BYTES["bfloat16"] / x.vllm_tp
    reward = 0.0
    if x.reward_arch is not None:
        reward = x.reward_arch.num_parameters * _BYTES["bfloat16"]
    g = lambda v: v / GiB  # noqa: E731
    resident = {"weights": g(n * wbytes), "grads": g(4 * n), "optimizer": g(opt_bytes)}
    plan = Plan(params_per_rank=n)
    plan.per_phase["train"] = resident | {
        "activations": g(acts),
        "logits": g(logits),
        "reference": g(reference),
        "reward": 0.0 if x.reward_offloaded else g(reward),
        "vllm": x.vllm_overhead_gib + (0.0 if x.vllm_sleep_level >= 1 else g(vllm_weights) + x.vllm_kv_cache_gib),
    }
    if not x.rollout:
        plan.per_phase["train"]["vllm"] = 0.0
        return plan
    plan.per_phase["generate"] = resident | {
        "reference": g(reference),
        "vllm": x.vllm_overhead_gib + g(vllm_weights) + x.vllm_kv_cache_gib,
        "reward": g(reward),
    }
    return plan


def check_fits(plan: Plan, gpu_gib: float, on_exceed: str = "error") -> str | None:
    """None if it fits; else the message (raised by the caller for on_exceed='error')."""
    phase, peak = plan.worst
    if peak <= gpu_gib:
        return None
    return (
        f"the {phase} phase needs {peak:.1f} GiB per GPU > {gpu_gib:.0f} GiB available:\n"
        f"{plan.report(gpu_gib)}\n"
        "fix: raise parallel.tp / parallel.pp, enable parallel.distributed_optimizer, set "
        "parallel.recompute=selective|full, lower train.micro_batch_size or data.max_length, "
        "offload the reference (reference.offload_to_cpu=true), or lower the vLLM KV cache"
        + ("" if on_exceed == "error" else " (planner.on_exceed=warn: continuing)")
    )
