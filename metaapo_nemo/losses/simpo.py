"""SimPO: simple, reference-free, length-normalised preference optimisation.

Meng, Xia, Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
(arXiv 2405.14734).

Formula (log pi are SUMS over response tokens, |y| the response token counts):
    avg_w = log pi(y_w) / |y_w|,   avg_l = log pi(y_l) / |y_l|
    m     = avg_w - avg_l
    L_i   = -log sigmoid(beta * m - gamma)
Reference log-probs are ignored (and may be None).

`SimPOLoss.margin()` is THE ONE definition of the SimPO meta input m: MetaAPO's sampling
decision, policy loss and meta update all call it. The MetaAPO authors' release fed the
meta-learner inconsistent SimPO inputs in two places; routing every use through this one
method rules that out.

Normalisation: loss = sum_i L_i / num_pairs_global, where num_pairs_global counts the pairs
of the WHOLE optimiser step (all micro-batches, all data-parallel ranks), so any
micro-batch x grad-accumulation split gives the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from metaapo_nemo.losses.base import LossOutput, PairLogps, check_positive, make_output


@dataclass(frozen=True)
class SimPOLoss:
    """Reference-free SimPO loss.

    Args:
        beta: Reward scale; > 0 (release: 2.5).
        gamma: Target reward margin; >= 0 (release: 0.6).
    """

    name: ClassVar[str] = "simpo"
    needs_reference: ClassVar[bool] = False

    beta: float = 2.5
    gamma: float = 0.6

    def __post_init__(self) -> None:
        check_positive(self.name, beta=self.beta)
        if not self.gamma >= 0:
            raise ValueError(f"simpo: gamma must be >= 0, got {self.gamma}")

    @staticmethod
    def _averages(logps: PairLogps) -> tuple[Tensor, Tensor]:
        return (
            logps.policy_chosen_B / logps.chosen_len_B,
            logps.policy_rejected_B / logps.rejected_len_B,
        )

    def margin(self, logps: PairLogps) -> Tensor:
        """m_B = pc / len_c - pr / len_r, with grad: the single SimPO meta input."""
        avg_chosen_B, avg_rejected_B = self._averages(logps)
        return avg_chosen_B - avg_rejected_B

    def pair_loss(self, margin_B: Tensor) -> Tensor:
        """L(m) = -log sigmoid(beta m - gamma), elementwise."""
        return -F.logsigmoid(self.beta * margin_B - self.gamma)

    def __call__(self, logps: PairLogps, num_pairs_global: int) -> LossOutput:
        """Loss of a micro-batch: sum of L_i divided by the step's global pair count.

        Rewards are beta * avg_w and beta * avg_l.

        Args:
            logps: Validated here; reference fields may be None.
            num_pairs_global: Pairs in the whole optimiser step across micro-batches and
                data-parallel ranks; >= 1.
        """
        logps.validate()
        avg_chosen_B, avg_rejected_B = self._averages(logps)
        margin_B = avg_chosen_B - avg_rejected_B
        return make_output(
            self.pair_loss(margin_B),
            num_pairs_global,
            margin_B,
            self.beta * avg_chosen_B,
            self.beta * avg_rejected_B,
        )
