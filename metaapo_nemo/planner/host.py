"""Host memory per rank in each phase (`Plan.host_per_phase`), and a CPU run's resident
memory per rank (`rank_rss_gib`)."""

from __future__ import annotations

from metaapo_nemo.planner.records import _BYTES, GiB, Plan, PlanInput
from metaapo_nemo.planner.terms import chunk_prompts, lora_params_per_rank, samples_gather_host_bytes


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
    trained = lora_params_per_rank(a, x.tp, x.pp, x.lora_rank, x.lora_targets) if x.lora_rank else n
    gathered = 12 * trained if x.distributed_optimizer else 12 * trained / x.dp
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
