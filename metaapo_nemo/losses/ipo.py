"""IPO: identity preference optimisation.

Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences" (arXiv 2310.12036).

Formula:
    m   = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    L_i = (m - 1 / (2 * beta))^2
Here sequence log-probs are SUMS over response tokens (METAAPO.md), whereas TRL's IPO
averages them over tokens; a beta tuned for TRL's IPO is therefore not transferable as is.

Normalisation: loss = sum_i L_i / num_pairs_global, where num_pairs_global counts the pairs
of the WHOLE optimiser step (all micro-batches, all data-parallel ranks), so any
micro-batch x grad-accumulation split gives the gradient of one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from metaapo_nemo.losses.base import (
    LossOutput,
    PairLogps,
    check_positive,
    make_output,
    reference_logratios,
)


@dataclass(frozen=True)
class IPOLoss:
    """Squared IPO loss with target margin 1 / (2 beta).

    Args:
        beta: Regularisation strength; > 0. The target margin is 1 / (2 beta).
    """

    name: ClassVar[str] = "ipo"
    needs_reference: ClassVar[bool] = True

    beta: float = 0.1

    def __post_init__(self) -> None:
        check_positive(self.name, beta=self.beta)

    def margin(self, logps: PairLogps) -> Tensor:
        """m_B = (pc - rc) - (pr - rr), with grad. Raises ValueError without references."""
        chosen_B, rejected_B = reference_logratios(logps, self.name)
        return chosen_B - rejected_B

    def pair_loss(self, margin_B: Tensor) -> Tensor:
        """L(m) = (m - 1 / (2 beta))^2, elementwise."""
        return (margin_B - 1.0 / (2.0 * self.beta)) ** 2

    def __call__(self, logps: PairLogps, num_pairs_global: int) -> LossOutput:
        """Loss of a micro-batch: sum of L_i divided by the step's global pair count.

        Rewards are reported as beta * (log pi - log pi_ref), as for DPO.

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
