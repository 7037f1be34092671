"""Distributed-optimiser checkpoint round trip on gloo (2 ranks, DP2).

    torchrun --standalone --nproc-per-node 2 tests/workers/distopt_worker.py SPEC.json

SPEC.json: ``{"hf_dir", "dir", "out", "steps": n}``. Builds the tiny policy with megatron's
distributed optimiser, takes `steps` Adam steps on seeded synthetic gradients, saves with
`checkpoint_model._save_model`, builds a FRESH policy, loads it with
`checkpoint_model._load_model`, and compares on every rank, bitwise: the fp32 main parameters,
each Adam state tensor (exp_avg, exp_avg_sq, step) and the model weights; then two more steps
on both with the same gradients, and the weights and Adam state after them. With ``"run_dir"``
also a whole `Checkpointer.save` + `find` (per-rank hashing, sized barrier, verification).
Writes the mismatches (max |diff|) to ``out``.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _policy(hf_dir: str, ctx):
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM, OptimSettings

    optim = OptimSettings(lr=1e-3, min_lr=1e-4, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95,
                          adam_eps=1e-8, clip_grad=0.0, warmup_steps=0, total_steps=100,
                          schedule="constant", distributed_optimizer=True)
    return MegatronLM(load_arch(hf_dir), ctx, hf_dir, BuildOptions(), optim)


def _step(lm, step: int) -> None:
    """One optimiser step on gradients that depend only on (parameter name, step)."""
    from metaapo_nemo.parallel import compat

    for chunk in lm.chunks:
        chunk.zero_grad_buffer()
        for name, p in chunk.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{step}".encode()))
            p.main_grad.copy_(torch.randn(p.shape, generator=g))
        chunk.finish_grad_sync()
    ok, _ = compat.optimizer_step(lm.optimizer)
    assert ok


def _adam_states(lm) -> dict[str, torch.Tensor]:
    out = {}
    for c, opt in enumerate(getattr(lm.optimizer, "chained_optimizers", [lm.optimizer])):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for i, p in enumerate(group["params"]):
                out[f"opt{c}.group{g}.param{i}.main"] = p.detach().clone()
                for k, v in inner.state.get(p, {}).items():
                    out[f"opt{c}.group{g}.param{i}.{k}"] = torch.as_tensor(v).detach().clone()
    return out


def _weights(lm) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(lm.chunks) for n, p in c.named_parameters()}


def _diff(a: dict, b: dict) -> dict[str, float]:
    bad = {}
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            bad[k] = float("inf")
        elif not torch.equal(a[k], b[k]):
            bad[k] = float((a[k].double() - b[k].double()).abs().max())
    return bad


def main() -> None:
    from metaapo_nemo import checkpoint, checkpoint_model
    from metaapo_nemo.parallel import state

    spec = json.loads(Path(sys.argv[1]).read_text())
    ctx = state.initialize(backend="gloo")
    a = _policy(spec["hf_dir"], ctx)
    for s in range(spec["steps"]):
        _step(a, s)
    directory = Path(spec["dir"])
    if ctx.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    checkpoint_model._save_model(a, directory, with_optimizer=True)
    dist.barrier()
    b = _policy(spec["hf_dir"], ctx)
    checkpoint_model._load_model(b, directory, with_optimizer=True)
    result = {"state": _diff(_adam_states(a), _adam_states(b)), "weights": _diff(_weights(a), _weights(b))}
    for s in range(spec["steps"], spec["steps"] + 2):  # two more steps on both
        _step(a, s)
        _step(b, s)
    result["after_steps"] = _diff(_weights(a), _weights(b))
    result["state_after_steps"] = _diff(_adam_states(a), _adam_states(b))
    result["num_state_tensors"] = len(_adam_states(a))
    if spec.get("run_dir"):  # the whole Checkpointer: per-rank hashing, sized barrier, verify
        ck = checkpoint.Checkpointer(Path(spec["run_dir"]), ctx, checksum=spec.get("checksum", "sha256"))
        saved = ck.save(5, a, {"scheduler": {}}, {"rank": dist.get_rank()})
        result["found"] = str(ck.find())
        result["saved"] = str(saved)
        result["timings"] = ck.last_save_timings
        result["manifest"] = json.loads((saved / checkpoint.MANIFEST).read_text())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if ctx.is_main:
        Path(spec["out"]).write_text(json.dumps(gathered, indent=1))
    state.destroy()


if __name__ == "__main__":
    main()
