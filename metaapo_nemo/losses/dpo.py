"""DPO and conservative DPO (cDPO).

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model" (arXiv 2305.18290); label smoothing as in cDPO (Mitchell 2023, "A note on
DPO with noisy preferences").

Formula (sequence log-probs are SUMS over response tokens):
    m   = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    L_i = -(1 - ls) * log sigmoid(beta * m) - ls * log sigmoid(-beta * m)
With pi == pi_ref every margin is 0 and L_i = ln 2 exactly (the step-1 sanity anchor).

Normalisation: loss = sum_i L_i / num_pairs_global, where num_pairs_global counts the pairs
of the WHOLE optimiser step (all micro-batches, all data-parallel ranks), so any
micro-batch x grad-accumulation split gives the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from metaapo_nemo.losses.base import (
    LossOutput,
    PairLogps,
    check_positive,
    make_output,
    reference_logratios,
)


@dataclass(frozen=True)
class DPOLoss:
    """Sigmoid DPO loss, conservative (cDPO) when `label_smoothing > 0`.

    Args:
        beta: Inverse temperature of the implicit reward; > 0.
        label_smoothing: Assumed probability that a label is flipped; in [0, 0.5).
    """

    name: ClassVar[str] = "dpo"
    needs_reference: ClassVar[bool] = True

    beta: float = 0.1
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_positive(self.name, beta=self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"dpo: label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )

    def margin(self, logps: PairLogps) -> Tensor:
        """m_B = (pc - rc) - (pr - rr), with grad. Raises ValueError without references."""
        chosen_B, rejected_B = reference_logratios(logps, self.name)
        return chosen_B - rejected_B

    def pair_loss(self, margin_B: Tensor) -> Tensor:
        """L(m) = -(1 - ls) log sigmoid(beta m) - ls log sigmoid(-beta m), elementwise."""
        z_B = self.beta * margin_B
        ls = self.label_smoothing
        return -(1.0 - ls) * F.logsigmoid(z_B) - ls * F.logsigmoid(-z_B)

    def __call__(self, logps: PairLogps, num_pairs_global: int) -> LossOutput:
        """Loss of a micro-batch: sum of L_i divided by the step's global pair count.

        Args:
            logps: Validated here; must carry reference log-probs.
            num_pairs_global: Pairs in the whole optimiser step across micro-batches and
                data-parallel ranks; >= 1.
        """
        logps.validate()
        chosen_B, rejected_B = reference_logratios(logps, self.name)
        margin_B = chosen_B - rejected_B
        return make_output(
            self.pair_loss(margin_B),
            num_pairs_global,
            margin_B,
            self.beta * chosen_B,
            self.beta * rejected_B,
        )
