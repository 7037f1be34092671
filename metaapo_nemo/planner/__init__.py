"""Per-GPU and per-node memory planner for a training layout (plain Python: runs on a login node).

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
L = layers, t = TP, p = PP, d = DP, c = CP, V = vocabulary, I = MLP width):
- parameters per rank: transformer layers L/p x per-layer/t, plus the embedding (V h / t)
  on the first stage and the output layer (V h / t, unless tied and p == 1) on the last.
- weights: params x bytes(dtype); megatron's DDP keeps fp32 gradient buffers (4 B/param);
  Adam: fp32 m and v (8 B) plus an fp32 master copy when training in bf16 (4 B); the
  distributed optimiser divides the optimiser part (master + m + v) by d x c.
- context parallelism: each rank holds s / c tokens of every training row, so s / c replaces s
  in the activations, logits and margin-pass terms below.
- activations per layer per micro-batch, bf16 (Korthikanti et al. 2022, TP without
  sequence parallel): s b h (10 + 24/t + 5 a s / (h t)) bytes; selective recompute drops
  the attention-score term 5 a s / (h t); full recompute keeps only each layer's input,
  2 s b h bytes. With sequence parallelism the 10 s b h and the layer input are split over
  TP too: s b h (34/t + 5 a s / (h t)), 2 s b h / t. fp32 training doubles them. A mixture-of-experts layer (E experts, top k,
  width I) keeps, instead of the dense MLP's 16 s b h / t, each token's k routed copies:
  s b (k (2 h + 6 I / t) + 4 E) (the permuted input, the experts' gate/up outputs and SwiGLU
  output, fp32 router probabilities); each rank holds num_experts / ep of its experts (split
  by TP), and the distributed optimiser shards those over the expert-data-parallel ranks
  (d x c / ep). One layer's router and dispatcher buffers are transient beside them
  (`moe_dispatch`): s b (2 k h x bytes(dtype) + 9 E) (the routed copies before and after the
  all-to-all, evenly spread; fp32 router logits and probabilities, the boolean routing map).
  1F1B holds up to p micro-batches in flight on the first stage, so the first stage holds
  activations of L/p layers x min(p, micro-batches) micro-batches.
- logits on the last stage: s b V / t x 4 B (fp32 for the vocab-parallel cross entropy),
  twice in training (logits and their gradient), once in the forward-only margin pass.
- margin-pass working set: one layer's activations without recompute (nothing is kept
  for a backward), i.e. `activation_bytes_per_layer(recompute=None)`.
- CUDA context: `cuda_context_gib` per process (one: vLLM runs in the trainer's process).
- NCCL: `nccl_gib_per_comm` per communicator; Megatron's set = TP, DP, CP, world (each if its
  size > 1) + 2 pipeline peers (p > 1); vLLM's set = its TP group (vllm_tp > 1).
- vLLM (awake): util x GPU in all. Of it, the KV cache gets what is left after its weights
  (N_params x 2 B / vllm_tp) and its profiling reserve: the dummy forward of
  max_num_batched_tokens T tokens, T (3 I / vllm_tp + 4 h) x 2 B (MoE: fused MoE's workspaces
  T (k (3 I / vllm_tp + h) + 4 h) x 2 B + T E x 4 B router logits; its experts are itemised as
  vllm_expert_weights, L x E x 3 h I x 2 B / vllm_tp); the dummy sampler,
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
- LoRA (rank r on the targeted projections, in -> out): A [r, in] and B [out, r] per projection
  (B of the column-parallel ones and A of the row-parallel ones split over TP): the base's
  weights stay (dtype), its gradients and optimiser state do not; gradients (fp32) and Adam
  (12 B) count the adapters only; the reference is the base with the adapters off (no weights;
  a per-round reference: one copy of the adapters).
- checkpoint: policy weights (dtype) + fp32 master + Adam m, v (12 B/param) + the moving
  reference (dtype), spread evenly over the ranks (`checkpoint_bytes`).
"""

from __future__ import annotations

from metaapo_nemo.planner.from_config import plan_input_from_config
from metaapo_nemo.planner.gpu import check_fits, checkpoint_report, plan_memory
from metaapo_nemo.planner.host import rank_rss_gib
from metaapo_nemo.planner.records import GiB, Plan, PlanInput
from metaapo_nemo.planner.terms import (
    activation_bytes_per_layer,
    checkpoint_bytes,
    chunk_prompts,
    kv_bytes_per_token,
    layer_params,
    lora_merged_params_per_rank,
    lora_params_per_rank,
    moe_dispatch_bytes,
    nccl_communicators,
    pairs_gather_bytes,
    params_per_rank,
    reward_activation_bytes,
    reward_parameters,
    samples_gather_host_bytes,
    vllm_profile_reserve_bytes,
)

__all__ = [
    "GiB",
    "Plan",
    "PlanInput",
    "activation_bytes_per_layer",
    "check_fits",
    "moe_dispatch_bytes",
    "checkpoint_bytes",
    "checkpoint_report",
    "chunk_prompts",
    "kv_bytes_per_token",
    "layer_params",
    "lora_merged_params_per_rank",
    "lora_params_per_rank",
    "nccl_communicators",
    "pairs_gather_bytes",
    "params_per_rank",
    "plan_input_from_config",
    "plan_memory",
    "rank_rss_gib",
    "reward_activation_bytes",
    "reward_parameters",
    "samples_gather_host_bytes",
    "vllm_profile_reserve_bytes",
]
