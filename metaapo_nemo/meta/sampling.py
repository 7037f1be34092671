"""Adaptive online sampling: which prompts get K fresh generations this round.

For each prompt: w = h_phi(x_meta) with the policy and meta-learner of that moment; u is
drawn from a generator seeded by (run seed, round, prompt id) -- NOT from a stream whose
position depends on rank, batch order or how many prompts came before -- so the decision
for a prompt is identical on every rank and reproducible after a resume. Sample iff u > w.

Modes (the paper's baselines/ablations share this code):
- "meta":   u > w                          (MetaAPO)
- "random": u > v, v ~ U(0, 1) independent (random sampling ablation)
- "all":    every prompt                   (Online DPO; sample-all-with-meta-weights)
- "none":   no prompt                      (offline DPO)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

MODES = ("meta", "random", "all", "none")


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_uniforms(prompt_ids: Sequence[int], seed: int, round_idx: int, stream: int = 0) -> torch.Tensor:
    """u_i ~ U(0,1) per prompt id, a pure function of (seed, round, prompt id, stream)."""
    out = torch.empty(len(prompt_ids), dtype=torch.float64)
    for i, pid in enumerate(prompt_ids):
        gen = torch.Generator().manual_seed(_seed(seed, round_idx, int(pid), stream))
        out[i] = torch.rand((), generator=gen, dtype=torch.float64)
    return out


def select_for_sampling(
    w_B: torch.Tensor, prompt_ids: Sequence[int], seed: int, round_idx: int, mode: str = "meta"
) -> torch.Tensor:
    """Boolean [B]: True where the prompt is sent to online generation."""
    if mode not in MODES:
        raise ValueError(f"metaapo.sampling={mode!r}; choose one of {', '.join(MODES)}")
    n = len(prompt_ids)
    if w_B.shape != (n,):
        raise ValueError(f"w has shape {tuple(w_B.shape)}, expected ({n},)")
    if mode == "all":
        return torch.ones(n, dtype=torch.bool)
    if mode == "none":
        return torch.zeros(n, dtype=torch.bool)
    u = sampling_uniforms(prompt_ids, seed, round_idx)
    threshold = w_B.detach().double().cpu()
    if mode == "random":
        threshold = sampling_uniforms(prompt_ids, seed, round_idx, stream=1)
    return u > threshold
