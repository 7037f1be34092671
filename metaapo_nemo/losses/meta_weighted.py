"""MetaAPO's meta-weighted mixing of the offline and online preference losses.

Per prompt i (METAAPO.md, "Policy loss"), with w_i = h_phi(x_meta_i) recomputed with the
CURRENT policy and DETACHED:

    loss_i = w_i * L(m_off_i) + (1 - w_i) * L(m_on_i)    if prompt i has an online pair
    loss_i = L(m_off_i)                                   otherwise, unselected="offline" (paper)
    (no term)                                             otherwise, unselected="drop" (release)

L is the configured family's per-pair loss (`PreferenceLoss.pair_loss`) of its own margin
(`PreferenceLoss.margin`: the ONE definition, also used for the meta input). The sum is
divided by the GLOBAL number of contributing prompts of the optimiser step, like every loss
here. Since w is detached, the policy gradient is exactly the w-weighted sum of the two
losses' gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

UNSELECTED = ("offline", "drop")


@dataclass(frozen=True)
class MixedLoss:
    loss: torch.Tensor  # scalar: sum of per-prompt terms / num_prompts_global
    per_prompt_B: torch.Tensor  # 0 where the prompt contributes nothing
    contributes_B: torch.Tensor  # bool
    loss_off_B: torch.Tensor  # detached L(m_off)
    loss_on_B: torch.Tensor  # detached L(m_on) (0 where no online pair)


def contributes(has_online_B: torch.Tensor, unselected: str) -> torch.Tensor:
    """Which prompts add a loss term (counted in the global normaliser)."""
    if unselected not in UNSELECTED:
        raise ValueError(f"metaapo.unselected={unselected!r}; choose 'offline' or 'drop'")
    return has_online_B.clone() if unselected == "drop" else torch.ones_like(has_online_B)


def mix_losses(
    loss_off_B: torch.Tensor,
    loss_on_B: torch.Tensor,
    w_B: torch.Tensor,
    has_online_B: torch.Tensor,
    num_prompts_global: int,
    unselected: str = "offline",
) -> MixedLoss:
    """Mixes per-pair losses with detached weights.

    Args:
        loss_off_B: L(m_off) per prompt, with grad (may be a zero tensor when the offline
            pair is not trained, e.g. Online DPO where w = 0).
        loss_on_B: L(m_on) per prompt, with grad; ignored where `has_online_B` is False.
        w_B: meta weights in [0, 1]; detached here.
        has_online_B: bool, the prompt has a usable online pair this round.
        num_prompts_global: contributing prompts in the whole optimiser step (>= 1).
        unselected: "offline" (paper: keep the offline term) or "drop" (release).
    """
    if num_prompts_global < 1:
        raise ValueError(f"num_prompts_global={num_prompts_global} must be >= 1")
    w = w_B.detach().to(loss_off_B.dtype)
    on = torch.where(has_online_B, loss_on_B, torch.zeros_like(loss_on_B))
    mixed = w * loss_off_B + (1.0 - w) * on
    keep = contributes(has_online_B, unselected)
    per = torch.where(has_online_B, mixed, torch.where(keep, loss_off_B, torch.zeros_like(loss_off_B)))
    return MixedLoss(
        loss=per.sum() / num_prompts_global,
        per_prompt_B=per,
        contributes_B=keep,
        loss_off_B=loss_off_B.detach(),
        loss_on_B=on.detach(),
    )
