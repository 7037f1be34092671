"""A training checkpoint -> an HF checkpoint (``metaapo-nemo export``).

    metaapo-nemo export runs/tiny_cpu --out runs/tiny_cpu/hf_latest           # latest good one
    metaapo-nemo export runs/tiny_cpu/checkpoints/step_00000016 --out hf_16 --dtype bfloat16
    torchrun --nproc-per-node 8 -m metaapo_nemo export runs/big --out /ckpt/big_hf   # its layout

The checkpoint (a run directory, its ``checkpoints/`` or one ``step_N``) is verified against
its manifest, its ``config.yaml`` (the resolved config of the run that wrote it) rebuilds
the policy from the same source model, the policy's weights are loaded from the Megatron
distributed checkpoint (any TP/PP layout: one process loads a TP8 x PP4 checkpoint at
TP1 x PP1) and written by the same HF export as the end of a run (`models.convert.export_hf`,
tokenizer and config copied from the source model).
"""

from __future__ import annotations

import json
from pathlib import Path

from metaapo_nemo.config.schema import ConfigError


def find_step_dir(path: str | Path) -> Path:
    """A step directory from a run directory, its checkpoints/ or a step directory itself.

    Raises:
        ConfigError: Nothing that looks like a checkpoint there (names what was looked for).
    """
    from metaapo_nemo.checkpoint import LATEST, MANIFEST

    p = Path(path)
    if (p / MANIFEST).exists() or (p / "policy").is_dir():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if (root / LATEST).exists():
        return root / (root / LATEST).read_text().strip()
    steps = sorted(d for d in root.glob("step_*") if d.is_dir())
    if steps:
        return steps[-1]
    raise ConfigError(f"{p}: no checkpoint there (looked for {MANIFEST}, checkpoints/{LATEST} and step_* "
                      "directories); give a run directory or a checkpoints/step_N directory")


def export_checkpoint(path: str | Path, out: str | Path, dtype: str | None = None) -> Path | None:
    """Writes the policy of the checkpoint at `path` as an HF checkpoint in `out`.

    Every process of the launch must call it; one process loads any layout at TP1 x PP1,
    several use the checkpoint's own layout. Returns `out` on the main rank, else None.

    Raises:
        ConfigError: No checkpoint at `path`, or its config no longer validates.
        CheckpointError: The checkpoint fails its manifest (names the file).
    """
    import torch

    from metaapo_nemo.checkpoint import Checkpointer, CheckpointError, stack_mismatch_message
    from metaapo_nemo.checkpoint_model import _load_model
    from metaapo_nemo.config.loader import load_config
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import export_hf
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.parallel import state
    from metaapo_nemo.parallel.launch import launch_info
    from metaapo_nemo.trainer import setup as S

    step = find_step_dir(path)
    config = step / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{step}: no config.yaml beside the weights; is this a checkpoint of this project?")
    single = launch_info().world_size == 1
    # One process: any layout loads at TP1 x PP1 (the checkpoint's tensors are sharded by name).
    layout = ["parallel.tp=1", "parallel.pp=1", "parallel.vpp=null", "parallel.cp=1", "parallel.ep=1",
              "parallel.sequence_parallel=false", "parallel.distributed_optimizer=false"] if single else []
    cfg = load_config(config, layout + ["checkpoint.resume=never"])
    p = cfg.parallel
    ctx = state.initialize(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, backend=p.backend, seed=cfg.run.seed, ep=p.ep)
    try:
        Checkpointer(step.parent, ctx, verify=cfg.checkpoint.verify,
                     checksum=cfg.checkpoint.checksum).find(explicit=str(step))
        model_dir = S.resolve_model_dir(cfg, ctx)
        arch = load_arch(model_dir)
        build = S.build_options(cfg)
        if build.lora is not None:  # adapters only mean something on the base they were trained on
            from metaapo_nemo.models.lora_peft import BaseFingerprint

            saved = json.loads((step / "trainer.json").read_text()).get("lora_base", {})
            try:
                BaseFingerprint(model_dir).load_state_dict(saved)
            except ValueError as exc:
                raise ConfigError(f"{step}: {exc}") from None
        policy = MegatronLM(arch, ctx, model_dir, build)
        try:
            _load_model(policy, step / "policy", with_optimizer=False)  # the weights only
        except Exception as exc:  # noqa: BLE001 - named with the writing and the reading stack
            trainer = json.loads((step / "trainer.json").read_text())
            raise CheckpointError(stack_mismatch_message(step, trainer, exc)) from exc
        torch_dtype = None if dtype is None else getattr(torch, dtype)
        written = export_hf(policy.modules(), arch, ctx, model_dir, out, dtype=torch_dtype)
        if policy.build.lora is not None:  # a LoRA run: the merged model, and the adapters for PEFT
            from metaapo_nemo.models.lora_peft import ADAPTER_DIR, export_peft

            export_peft(policy.modules(), policy.arch, ctx, policy.build.lora, str(model_dir), Path(out) / ADAPTER_DIR)
        return written
    finally:
        state.destroy()
