"""KTO: Kahneman-Tversky optimisation, unpaired form.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
(arXiv 2402.01306).

Each chosen response is a desirable example and each rejected response an undesirable
example, scored independently against a reference point z0:
    r_w = log pi(y_w) - log pi_ref(y_w),   r_l = log pi(y_l) - log pi_ref(y_l)
    z0  = max(KL_estimate, 0), detached
    L_D = lambda_D * (1 - sigmoid(beta * (r_w - z0)))
    L_U = lambda_U * (1 - sigmoid(beta * (z0 - r_l)))
    L_i = L_D + L_U                     (the pair's two examples)
    m   = r_w - r_l                     (margin, for logging and MetaAPO)

KL estimate: pass `kl_estimate` (a scalar) to `__call__`. When it is None the detached
batch estimate mean(concat(r_w, r_l)) is used, which depends on the micro-batch: under
gradient accumulation or data parallelism the caller should compute one estimate for the
step (DP-averaged, e.g. an all-reduce mean of this rank's estimate) and pass it, otherwise
micro-batch splits no longer give the same gradient as one big batch.

MetaAPO (`pair_loss`): mixing needs L as a function of one margin m, but KTO's loss also
depends on z0 and on how m splits into r_w and r_l, so a MetaAPO config with loss.name=kto is
refused at start-up (config.schema). `pair_loss(m)`, kept for the `PreferenceLoss` protocol,
is the value of a pair at the symmetric split r_w = m/2, r_l = -m/2 with z0 = 0:
    L(m) = (lambda_D + lambda_U) * (1 - sigmoid(beta * m / 2))
`__call__` computes the full loss above.

Normalisation: loss = sum_i L_i / num_pairs_global, where num_pairs_global counts the pairs
of the WHOLE optimiser step (all micro-batches, all data-parallel ranks), so any
micro-batch x grad-accumulation split gives the gradient of one big batch (with a fixed
`kl_estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from metaapo_nemo.losses.base import (
    LossOutput,
    PairLogps,
    check_positive,
    make_output,
    reference_logratios,
)


@dataclass(frozen=True)
class KTOLoss:
    """Unpaired KTO loss over the chosen (desirable) and rejected (undesirable) responses.

    Args:
        beta: Reward scale; > 0.
        desirable_weight: lambda_D, weight of desirable examples; > 0.
        undesirable_weight: lambda_U, weight of undesirable examples; > 0.
    """

    name: ClassVar[str] = "kto"
    needs_reference: ClassVar[bool] = True

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        check_positive(
            self.name,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )

    def margin(self, logps: PairLogps) -> Tensor:
        """m_B = r_w - r_l, with grad. Raises ValueError without references."""
        chosen_B, rejected_B = reference_logratios(logps, self.name)
        return chosen_B - rejected_B

    def pair_loss(self, margin_B: Tensor) -> Tensor:
        """Symmetric-split KTO value (lambda_D + lambda_U) * (1 - sigmoid(beta m / 2)).

        Equals the full KTO loss of a pair with r_w = m/2, r_l = -m/2 and z0 = 0 (not KTO's
        loss in general: MetaAPO refuses loss.name=kto).
        """
        weight = self.desirable_weight + self.undesirable_weight
        return weight * (1.0 - torch.sigmoid(self.beta * margin_B / 2.0))

    def reference_point(
        self, chosen_B: Tensor, rejected_B: Tensor, kl_estimate: Tensor | None
    ) -> Tensor:
        """z0 = max(kl, 0), detached; kl defaults to mean(concat(r_w, r_l)) of this batch."""
        if kl_estimate is None:
            kl = torch.cat([chosen_B, rejected_B]).mean()
        else:
            if not isinstance(kl_estimate, Tensor) or kl_estimate.numel() != 1:
                raise ValueError(
                    f"kto: kl_estimate must be a scalar tensor, got {kl_estimate!r}"
                )
            kl = kl_estimate.reshape(())
        return kl.detach().clamp(min=0)

    def __call__(
        self, logps: PairLogps, num_pairs_global: int, kl_estimate: Tensor | None = None
    ) -> LossOutput:
        """Loss of a micro-batch: sum of L_i divided by the step's global pair count.

        Args:
            logps: Validated here; must carry reference log-probs.
            num_pairs_global: Pairs in the whole optimiser step across micro-batches and
                data-parallel ranks; >= 1.
            kl_estimate: Scalar estimate of KL(pi || pi_ref) for the reference point; pass
                a DP-averaged value under data parallelism. None: detached batch estimate.
        """
        logps.validate()
        chosen_B, rejected_B = reference_logratios(logps, self.name)
        z0 = self.reference_point(chosen_B, rejected_B, kl_estimate).to(chosen_B)
        desirable_B = self.desirable_weight * (1.0 - torch.sigmoid(self.beta * (chosen_B - z0)))
        undesirable_B = self.undesirable_weight * (
            1.0 - torch.sigmoid(self.beta * (z0 - rejected_B))
        )
        return make_output(
            desirable_B + undesirable_B,
            num_pairs_global,
            chosen_B - rejected_B,
            self.beta * chosen_B,
            self.beta * rejected_B,
        )
