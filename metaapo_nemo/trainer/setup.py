"""Building blocks a recipe's `setup()` composes: model source, run dir, optimiser, loss."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from metaapo_nemo.config.loader import resolve_repo_path, to_yaml
from metaapo_nemo.config.schema import Config, ConfigError, round_size_error
from metaapo_nemo.losses import PreferenceLoss, build_loss, loss_params
from metaapo_nemo.models.megatron_model import BuildOptions
from metaapo_nemo.models.policy import OptimSettings
from metaapo_nemo.parallel.state import ParallelContext
from metaapo_nemo.trainer.rows import layout_from_config

T = TypeVar("T")

def _barrier(ctx: ParallelContext) -> None:
    if dist.is_initialized() and ctx.dims.world_size > 1:
        dist.barrier()


def main_first(ctx: ParallelContext, build: Callable[[], T]) -> T:
    """`build()` on the main rank, then (after a barrier) on every other rank.

    For artefacts built once into a shared cache (tiny models, tiny reward models): the
    other ranks then find them there. Building on every rank at once is not only wasted
    work: transformers >= 5 `save_pretrained` writes the weights on torch.distributed rank 0
    only, so another rank's build leaves a directory without them.
    """
    out = build() if ctx.is_main else None
    _barrier(ctx)
    return out if ctx.is_main else build()


def resolve_model_dir(cfg: Config, ctx: ParallelContext) -> Path:
    """The HF checkpoint directory: `model.path`, or a tiny model built once in the cache.

    Rank 0 builds the tiny checkpoint (atomically); the others wait at a barrier.
    """
    if cfg.model.path is not None:
        path = resolve_repo_path(cfg.model.path)
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model.path={cfg.model.path!r}: no config.json in {path}; point it at an HF "
                "checkpoint directory, or set model.tiny to build a tiny model"
            )
        return path
    from metaapo_nemo.models.tiny import TinyModelSpec, ensure_tiny_checkpoint

    assert cfg.model.tiny is not None
    spec = TinyModelSpec(**cfg.model.tiny.model_dump())
    cache = resolve_repo_path(cfg.run.cache_dir) / "tiny_models"
    return main_first(ctx, lambda: ensure_tiny_checkpoint(spec, cache))


def data_source(path: str) -> str:
    """A local data path (resolved against the repo root too) or, if none exists, a dataset name."""
    local = resolve_repo_path(path)
    return str(local) if local.exists() else path


def make_run_dir(cfg: Config, ctx: ParallelContext) -> Path:
    """Creates output_dir/name and writes the resolved config (main rank)."""
    run_dir = resolve_repo_path(cfg.run.output_dir) / cfg.run.name
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(to_yaml(cfg))
        tmp.replace(run_dir / "config.yaml")
    _barrier(ctx)
    return run_dir


def build_options(cfg: Config) -> BuildOptions:
    """Model build options from the config, validated for THIS machine (ConfigError if not)."""
    import torch

    m, p = cfg.model, cfg.parallel
    cuda = torch.cuda.is_available()
    opts = BuildOptions(dtype=m.resolved_dtype(cuda), recompute=p.recompute, sequence_parallel=p.sequence_parallel,
                        transformer_impl=m.transformer_impl, fp8=m.fp8, fp8_recipe=m.fp8_recipe,
                        fp8_amax_history_len=m.fp8_amax_history_len,
                        fp8_amax_compute_algo=m.fp8_amax_compute_algo,
                        attention=cfg.train.attention)
    try:
        impl = opts.spec_choice(on_gpu=cuda).impl
        layout = layout_from_config(cfg, impl)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if layout.thd and impl == "transformer_engine":
        _require_te_for_thd()
    lora = None
    if cfg.lora is not None:
        from metaapo_nemo.models.lora import LoraSettings

        if cfg.lora.compute == "merged" and impl == "transformer_engine":
            raise ConfigError(
                "lora.compute=merged runs megatron's local linears on a merged weight; Transformer Engine's "
                "fused linears (model.transformer_impl resolves to transformer_engine here) take none: use "
                "lora.compute=adapters, or model.transformer_impl=local")
        lora = LoraSettings(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets(), cfg.run.seed,
                            cfg.lora.compute)
    # shared-prompt / packed rows need RoPE at explicit per-token positions
    return dataclasses.replace(opts, explicit_positions=layout.explicit_positions, packed_thd=layout.thd, lora=lora)


def _require_te_for_thd(minimum: tuple[int, int] = (1, 10)) -> None:
    """megatron drops ``cu_seqlens_*_padded`` for Transformer Engine < 1.10, and THD rows carry
    each row's padding in their last slot: an older TE would attend into the padding."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("transformer-engine", "transformer_engine"):
        try:
            found = version(dist)
            break
        except PackageNotFoundError:
            continue
    else:
        return  # the TE spec was chosen, so TE imports; no distribution metadata to check
    major_minor = tuple(int(x) for x in re.findall(r"\d+", found)[:2])
    if major_minor < minimum:
        raise ConfigError(
            "train.batching=pack on the Transformer Engine spec packs rows as THD, which needs "
            f"transformer-engine >= {'.'.join(map(str, minimum))} (found {found}: megatron ignores padded "
            "cu_seqlens before it); install constraints-gpu.txt's TE, or set train.batching=bucket")


def optim_settings(cfg: Config, total_steps: int) -> OptimSettings:
    o = cfg.optim
    return OptimSettings(
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        warmup_steps=math.ceil(o.warmup_ratio * total_steps),
        total_steps=total_steps,
        schedule=o.schedule,
        distributed_optimizer=cfg.parallel.distributed_optimizer,
    )


def loss_from_config(cfg: Config) -> PreferenceLoss:
    """Builds the configured loss. A constructor argument `p` of loss `name` is read from
    the config key `loss.<name>_<p>` if it exists (e.g. loss.simpo_gamma), else `loss.<p>`.
    """
    section = cfg.loss.model_dump()
    name = cfg.loss.name
    kwargs = {}
    for p in loss_params(name):
        for key in (f"{name}_{p}", p):
            if key in section:
                kwargs[p] = section[key]
                break
    return build_loss(name, **kwargs)


def total_steps(num_pairs: int, cfg: Config) -> int:
    """Optimiser steps of the run: full global batches per epoch x epochs, capped by max_steps."""
    per_epoch = num_pairs // cfg.train.global_batch_size
    if per_epoch == 0:
        raise ConfigError(
            f"the data has {num_pairs} usable pairs, fewer than train.global_batch_size="
            f"{cfg.train.global_batch_size}; lower the global batch or add data"
        )
    steps = per_epoch * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def metaapo_total_steps(num_pairs: int, cfg: Config) -> int:
    """Nominal optimiser steps of a MetaAPO run (sets the LR schedule length).

    Each round of `metaapo.round_size` prompts (cut to whole global batches) trains one pass
    over its prompts. With `metaapo.unselected=drop` rounds train only the prompts that got
    an online pair, so a run may take fewer steps than this nominal count.
    """
    G, R = cfg.train.global_batch_size, cfg.metaapo.round_size
    error = round_size_error(R, G)
    if error:
        raise ConfigError(error)
    per_epoch = sum(min(R, num_pairs - s) // G for s in range(0, num_pairs, R))
    if per_epoch == 0:
        raise ConfigError(
            f"the data has {num_pairs} usable prompts, fewer than train.global_batch_size={G}; "
            "lower the global batch or add data"
        )
    steps = per_epoch * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps

