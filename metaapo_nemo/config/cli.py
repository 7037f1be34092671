"""Command-line front end shared by every recipe: ``--config``, ``--dry-run``, overrides.

``parse`` turns argv into a validated ``Config``; ``dry_run_report`` prints what a run would
do (resolved config, parallel layout, batch arithmetic, memory estimate) without building a
model, importing torch or touching a GPU, so it works on a login node::

    python recipes/dpo.py --dry-run train.global_batch_size=16 parallel.tp=2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from metaapo_nemo.config.loader import (
    DEFAULT_RECIPES,
    display_path,
    load_config,
    resolve_repo_path,
    to_yaml,
)
from metaapo_nemo.config.schema import Config, ConfigError, check_layout, round_size_error

_GIB = 1024**3


def build_arg_parser(
    description: str | None = None, method: str = "metaapo"
) -> argparse.ArgumentParser:
    """Return the parser every recipe uses (recipes may add their own arguments).

    Args:
        description: Shown by ``--help``; usually the recipe's module docstring.
        method: The recipe's method; ``--config`` defaults to its config (``DEFAULT_RECIPES``).
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default = DEFAULT_RECIPES[method]
    parser.add_argument(
        "--config",
        default=str(default),
        metavar="PATH",
        help=f"recipe YAML of method {method} (default: {display_path(default)})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config, parallel layout and memory estimate, then exit",
    )
    plan = parser.add_argument_group(
        "planning (--dry-run on a login node: the world size of the run to plan)")
    plan.add_argument("--world-size", type=int, metavar="N", help="processes (GPUs) of the run")
    plan.add_argument("--nodes", type=int, metavar="N", help="nodes, with --gpus-per-node")
    plan.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per node (one process each)")
    plan.add_argument(
        "--sbatch",
        metavar="SCRIPT",
        help="read nodes and tasks from an sbatch script's #SBATCH lines; its RECIPE= is the "
        "config unless --config is given",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every library log record (vLLM, megatron, transformers) on the terminal "
        "(same as run.verbose=true); they always go to the run directory's log.txt",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. optim.lr=1e-5 train.max_steps=20 model.tiny.arch=qwen2",
    )
    return parser


def parse(
    argv: Sequence[str] | None = None, description: str | None = None, method: str = "metaapo"
) -> tuple[Config, argparse.Namespace]:
    """Parse argv into a validated config of the recipe's method.

    Args:
        argv: Arguments without the program name; None reads ``sys.argv[1:]``.
        description: Passed to ``build_arg_parser``.
        method: The recipe's method ("dpo" or "metaapo"): the default config, and the
            method a ``--config`` must run (a YAML stating another one is refused).

    Returns:
        ``(config, namespace)``; ``namespace.dry_run`` tells the recipe to print
        ``dry_run_report`` and exit.

    Raises:
        SystemExit: With status 2 and the ``ConfigError`` message (no traceback) when the
            config is invalid, as argparse does for bad arguments.
    """
    parser = build_arg_parser(description, method)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    planning = [f for f in ("world_size", "nodes", "gpus_per_node", "sbatch") if getattr(args, f) is not None]
    if planning and not args.dry_run:
        flags = ", ".join("--" + f.replace("_", "-") for f in planning)
        parser.error(f"{flags}: for --dry-run only (they say which run to plan); a run's world size is "
                     "what torchrun or srun launched")
    explicit_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    try:
        if args.sbatch is not None and not explicit_config:
            from metaapo_nemo.config.world import read_sbatch

            recipe = read_sbatch(args.sbatch).recipe
            if recipe is None:
                raise ConfigError(f"{args.sbatch} names no RECIPE=conf/<x>.yaml; pass --config too")
            args.config = recipe
        overrides = list(args.overrides) + (["run.verbose=true"] if args.verbose else [])
        cfg = load_config(args.config, overrides, method=method)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: config error:\n{exc}\n")
    return cfg, args


def world_size_from_env() -> int:
    """The world size torchrun or srun launched (``parallel.launch.launch_info``); 1 when
    neither did."""
    from metaapo_nemo.parallel.launch import LaunchEnvError, launch_info

    try:
        return launch_info().world_size
    except LaunchEnvError as exc:
        raise ConfigError(str(exc)) from None


def read_model_dims(cfg: Config) -> dict | None:
    """Read the model's shape without building it.

    From ``model.path``'s ``config.json`` (plain JSON, no transformers import) when the file
    exists, else from ``model.tiny``.

    Returns:
        ``{"num_layers", "num_attention_heads", "num_kv_heads", "vocab_size", "hidden_size",
        "intermediate_size", "max_position_embeddings", "tie_word_embeddings"}`` (values
        may be None when the checkpoint omits them), or None when ``model.path`` has no
        readable config.json.
    """
    from metaapo_nemo.models.arch import TINY_EXPERTS

    tiny = cfg.model.tiny
    if tiny is not None:
        return {
            "num_layers": tiny.num_layers,
            "num_attention_heads": tiny.num_attention_heads,
            "num_kv_heads": tiny.num_key_value_heads,
            "vocab_size": tiny.vocab_size,
            "hidden_size": tiny.hidden_size,
            "intermediate_size": tiny.intermediate_size,
            "max_position_embeddings": tiny.max_position_embeddings,
            "tie_word_embeddings": tiny.tie_word_embeddings,
            "num_experts": TINY_EXPERTS if tiny.arch == "qwen3_moe" else 0,
        }
    hf = read_arch_json(cfg)
    if hf is None:
        return None
    hf = hf.get("text_config", hf)  # multimodal wrappers keep the LM under text_config
    heads = hf.get("num_attention_heads")
    return {
        "num_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads", heads),
        "vocab_size": hf.get("vocab_size"),
        "hidden_size": hf.get("hidden_size"),
        "intermediate_size": hf.get("intermediate_size"),
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
        "num_experts": hf.get("num_experts", hf.get("num_local_experts", 0)),
    }


def read_arch_json(cfg: Config) -> dict | None:
    """The HF config dict of model.path (if reachable), else of model.arch_config, else None."""
    candidates = []
    if cfg.model.path is not None:
        candidates.append(resolve_repo_path(cfg.model.path) / "config.json")
    if cfg.model.arch_config is not None:
        candidates.append(resolve_repo_path(cfg.model.arch_config))
    for config_json in candidates:
        try:
            return json.loads(config_json.read_text())
        except (OSError, ValueError):
            continue
    return None


def _tiny_hf_dict(t) -> dict:
    """The HF config dict of a `TinyModelConfig` (what `models.tiny` builds)."""
    return {"model_type": t.arch, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads, "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings if t.tie_word_embeddings is not None
            else t.arch == "qwen2"}


def _arch_or_none(hf: dict | None):
    return _arch_or_reason(hf)[0]


def _arch_or_reason(hf: dict | None):
    """(ModelArch, None), or (None, why the planner cannot read this shape)."""
    from metaapo_nemo.models.arch import arch_from_hf_dict

    if hf is None:
        return None, "no config"
    try:
        return arch_from_hf_dict(hf.get("text_config", hf)), None
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"not a shape the planner reads ({exc})"


def reward_arch(cfg: Config):
    """The HF reward model's architecture from reward.tiny, reward.path's config.json or
    reward.arch_config; None for a rule reward, no reward, or a shape not readable here."""
    return reward_arch_or_reason(cfg)[0]


def reward_arch_or_reason(cfg: Config):
    """(the HF reward model's ModelArch, None), or (None, why it cannot be sized here: a
    sentence naming the keys tried), or (None, None) where no reward model runs (a rule
    reward, no reward section)."""
    r = cfg.reward
    if r is None or r.backend != "hf":
        return None, None
    if r.tiny is not None:
        return _arch_or_reason(_tiny_hf_dict(r.tiny))
    tried = []
    for key, value, candidate in (
        ("reward.path", r.path, None if r.path is None else resolve_repo_path(r.path) / "config.json"),
        ("reward.arch_config", r.arch_config, None if r.arch_config is None else resolve_repo_path(r.arch_config)),
    ):
        if candidate is None:
            continue
        try:
            hf = json.loads(candidate.read_text())
        except (OSError, ValueError) as exc:
            tried.append(f"{key}={value} ({candidate} not readable here: {type(exc).__name__})")
            continue
        arch, why = _arch_or_reason(hf)
        if arch is not None:
            return arch, None
        tried.append(f"{key}={value}: {why}")
    if r.arch_config is None:
        tried.append("reward.arch_config is not set")
    return None, "; ".join(tried)


def memory_plan(cfg: Config, tp: int, pp: int, dp: int, accum: int, ranks_per_node: int | None = None):
    """The planner's per-GPU estimate of what the config's method runs
    (`planner.plan_input_from_config`), or None if the architecture is unknown."""
    hf = _tiny_hf_dict(cfg.model.tiny) if cfg.model.tiny is not None else read_arch_json(cfg)
    arch = _arch_or_none(hf)
    if arch is None:
        return None  # the rough estimate is printed instead
    return _plan(cfg, arch, tp, pp, dp, accum, ranks_per_node)


def _plan(cfg: Config, arch, tp: int, pp: int, dp: int, accum: int, ranks_per_node: int | None):
    """`plan_memory` of the config's method on `arch`, the reward model sized as the config says."""
    from metaapo_nemo.planner import plan_input_from_config, plan_memory

    rm, rm_unsized = reward_arch_or_reason(cfg)
    return plan_memory(plan_input_from_config(cfg, arch, tp, pp, dp, accum, rm, reward_unsized=rm_unsized,
                                              ranks_per_node=ranks_per_node))


def startup_memory_check(cfg: Config, arch, tp: int, pp: int, dp: int, on_gpu: bool,
                         gpu_memory_gib: float | None = None) -> str | None:
    """The memory plan enforced when a run starts on GPU machines (the dry run's plan, with
    the architecture just loaded and ranks per node from the launcher): None if it fits or
    this is a CPU run; the warning for planner.on_exceed=warn.

    Args:
        gpu_memory_gib: The device's memory (torch's total); the smaller of it and
            planner.gpu_memory_gib is planned against.

    Raises:
        ConfigError: The plan does not fit (or has a problem) and planner.on_exceed=error.
    """
    if not on_gpu:
        return None
    from metaapo_nemo.config.world import planned_ranks_per_node
    from metaapo_nemo.planner import check_fits

    plan = _plan(cfg, arch, tp, pp, dp, cfg.train.micro_batches_per_step(dp), planned_ranks_per_node(tp * pp * dp))
    limit = cfg.planner.gpu_memory_gib if gpu_memory_gib is None else min(gpu_memory_gib, cfg.planner.gpu_memory_gib)
    problem = check_fits(plan, limit, cfg.planner.on_exceed)
    if problem is not None and cfg.planner.on_exceed == "error":
        raise ConfigError(f"{problem}\n(checked at start-up; planner.on_exceed=warn runs anyway)")
    return problem


def estimate_params(dims: dict) -> int | None:
    """Approximate parameter count of a llama/qwen2-style decoder (None if shape unknown)."""
    keys = ("num_layers", "num_attention_heads", "num_kv_heads", "vocab_size", "hidden_size")
    if any(dims.get(k) is None for k in keys + ("intermediate_size",)):
        return None
    h, heads, kv = dims["hidden_size"], dims["num_attention_heads"], dims["num_kv_heads"]
    head_dim = h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o and k, v projections
    mlp = 3 * h * dims["intermediate_size"]  # gate, up, down
    embed = dims["vocab_size"] * h * (1 if dims.get("tie_word_embeddings") else 2)
    return dims["num_layers"] * (attn + mlp + 2 * h) + embed + h


def _memory_lines(cfg: Config, dims: dict | None, tp: int, pp: int, dp: int) -> list[str]:
    n = estimate_params(dims or {})
    if n is None:
        return ["memory estimate: none, the model's shape is unknown (model.path has no readable "
                "config.json here): set model.arch_config to its config.json (conf/models/*.json)"]
    weight_bytes = 2 if cfg.model.resolved_dtype(on_gpu=True) == "bfloat16" else 4  # a GPU plan
    # Megatron keeps fp32 grads; Adam keeps two fp32 moments, plus fp32 master weights in bf16.
    optim_bytes = 8 + (4 if weight_bytes == 2 else 0)
    shard = n / (tp * pp)
    optim = shard * optim_bytes / (dp if cfg.parallel.distributed_optimizer else 1)
    policy = shard * (weight_bytes + 4) + optim
    ref = 0.0 if cfg.loss.name == "simpo" else shard * weight_bytes
    if cfg.lora is not None:  # the base frozen (weights only), the reference = adapters off
        policy, ref = shard * weight_bytes, 0.0
    return [
        f"memory estimate per rank (weights, grads, optimizer; activations excluded): "
        f"{(policy + ref) / _GIB:.3f} GiB",
        f"  params {n / 1e6:.2f}M total, {shard / 1e6:.2f}M per rank (/ tp {tp} x pp {pp}); "
        f"policy {policy / _GIB:.3f} GiB, reference {ref / _GIB:.3f} GiB"
        + (" (offloaded to CPU)" if cfg.reference.offload_to_cpu and ref else "")
        + (" (LoRA: the base is frozen and is the reference; its adapters are in the memory plan)"
           if cfg.lora is not None else ""),
    ]


def plan_report(cfg: Config, args: argparse.Namespace, rows_line: str | None = None) -> str:
    """`dry_run_report` at the world size the flags, the sbatch script or the launcher give
    (`config.world.planned_world_size`), with that source named.

    Raises:
        ConfigError: As `planned_world_size` and `dry_run_report`.
    """
    from metaapo_nemo.config.world import planned_ranks_per_node, planned_world_size

    world, source = planned_world_size(cfg, args.config, world_size=args.world_size, nodes=args.nodes,
                                       gpus_per_node=args.gpus_per_node, sbatch=args.sbatch)
    per_node = planned_ranks_per_node(world, gpus_per_node=args.gpus_per_node, sbatch=args.sbatch)
    return (dry_run_report(cfg, world, read_model_dims(cfg), ranks_per_node=per_node, rows_line=rows_line)
            + f"\nworld size {world}: {source}; {per_node} ranks per node")


def dry_run_report(cfg: Config, world_size: int, model_dims: dict | None,
                   ranks_per_node: int | None = None, rows_line: str | None = None) -> str:
    """Describe what a run would do, without building anything.

    Args:
        cfg: The validated config.
        world_size: Number of ranks (see ``world_size_from_env``).
        model_dims: From ``read_model_dims`` (None skips the shape checks and estimate).
        ranks_per_node: Ranks sharing a node's host memory (None: min(world_size, 8)).
        rows_line: How each layer spec lays out a step's rows (`trainer.rows.describe_rows`;
            the caller computes it: config does not import trainer).

    Returns:
        The resolved YAML, the parallel layout, the micro-batch arithmetic and a memory
        estimate per rank.

    Raises:
        ConfigError: If the layout does not fit ``world_size`` or the model's shape.
    """
    dims = check_layout(cfg, world_size, model_dims)
    t = cfg.train
    if cfg.method == "metaapo" and round_size_error(cfg.metaapo.round_size, t.global_batch_size):
        raise ConfigError(round_size_error(cfg.metaapo.round_size, t.global_batch_size))
    accum = t.micro_batches_per_step(dims.dp)
    lines = [
        "# resolved config",
        to_yaml(cfg).rstrip(),
        "",
        dims.describe(),
        "",
        f"batch: global_batch_size {t.global_batch_size} / (micro_batch_size "
        f"{t.micro_batch_size} x dp {dims.dp}) = {accum} micro-batches per step "
        "(gradient accumulation)",
        f"steps: max_steps={'null (all epochs)' if t.max_steps is None else t.max_steps}, "
        f"epochs={t.epochs}",
    ]
    if rows_line is not None:
        lines.append(rows_line)
    if model_dims is not None:
        shape = ", ".join(f"{k}={v}" for k, v in model_dims.items())
        lines.append(f"model: {shape}")
    plan = memory_plan(cfg, dims.tp, dims.pp, dims.dp, accum, ranks_per_node)
    if plan is None:
        lines += _memory_lines(cfg, model_dims, dims.tp, dims.pp, dims.dp)
    else:
        from metaapo_nemo.planner import check_fits

        lines.append(plan.report(cfg.planner.gpu_memory_gib))
        problem = check_fits(plan, cfg.planner.gpu_memory_gib, cfg.planner.on_exceed)
        if problem is not None and cfg.planner.on_exceed == "error":
            raise ConfigError(problem)
        if problem is not None:
            lines.append("WARNING: " + problem)
    return "\n".join(lines)


__all__ = [
    "build_arg_parser",
    "dry_run_report",
    "estimate_params",
    "parse",
    "plan_report",
    "read_model_dims",
    "world_size_from_env",
]
