"""Shared contract of the preference losses: inputs, outputs and the `PreferenceLoss` seam.

Shape legend:
    B = preference pairs in the micro-batch held by this rank.

Every sequence log-prob is a SUM of per-token log-probs over the response tokens (prompt
tokens masked), as in METAAPO.md. Losses are normalised by the GLOBAL number of pairs in
the optimiser step (all micro-batches of the gradient-accumulation window on all
data-parallel ranks), not by B, so that summing the per-micro-batch losses (and their
gradients) gives exactly the loss and gradient of one big batch.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

from torch import Tensor

_POLICY_FIELDS = ("policy_chosen_B", "policy_rejected_B", "chosen_len_B", "rejected_len_B")
_REF_FIELDS = ("ref_chosen_B", "ref_rejected_B")


@dataclass(frozen=True)
class PairLogps:
    """Sequence log-probs of a micro-batch of preference pairs.

    Attributes:
        policy_chosen_B: Policy log pi_theta(y_w | x), summed over response tokens.
        policy_rejected_B: Policy log pi_theta(y_l | x), summed over response tokens.
        chosen_len_B: Number of response tokens of y_w (float), for length-normalised losses.
        rejected_len_B: Number of response tokens of y_l (float).
        ref_chosen_B: Reference log pi_ref(y_w | x) sums; None only for reference-free losses.
        ref_rejected_B: Reference log pi_ref(y_l | x) sums; None together with ref_chosen_B.
    """

    policy_chosen_B: Tensor
    policy_rejected_B: Tensor
    chosen_len_B: Tensor
    rejected_len_B: Tensor
    ref_chosen_B: Tensor | None = None
    ref_rejected_B: Tensor | None = None

    @property
    def has_reference(self) -> bool:
        """Whether reference log-probs are present."""
        return self.ref_chosen_B is not None and self.ref_rejected_B is not None

    def validate(self) -> None:
        """Check shapes, lengths and reference presence.

        Raises:
            ValueError: naming the offending field when a field is not a 1-D tensor, its
                shape differs from `policy_chosen_B`, a length is <= 0, or exactly one of
                the two reference fields is None.
        """
        expected = None
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _REF_FIELDS:
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"PairLogps.{f.name} must be a torch.Tensor, got {type(value)}")
            if value.dim() != 1:
                raise ValueError(
                    f"PairLogps.{f.name} must be 1-D [B], got shape {tuple(value.shape)}"
                )
            if expected is None:
                expected = value.shape
            elif value.shape != expected:
                raise ValueError(
                    f"PairLogps.{f.name} has shape {tuple(value.shape)} but "
                    f"policy_chosen_B has shape {tuple(expected)}; all fields must match"
                )
        for name in ("chosen_len_B", "rejected_len_B"):
            if bool((getattr(self, name) <= 0).any()):
                raise ValueError(f"PairLogps.{name} must be > 0 for every pair (empty response?)")
        if (self.ref_chosen_B is None) != (self.ref_rejected_B is None):
            missing = "ref_chosen_B" if self.ref_chosen_B is None else "ref_rejected_B"
            raise ValueError(
                f"PairLogps.{missing} is None but the other reference field is set; "
                "pass both reference log-probs or neither"
            )


@dataclass(frozen=True)
class LossOutput:
    """Result of a preference loss on one micro-batch.

    Attributes:
        loss: Scalar `per_pair_B.sum() / num_pairs_global` (NOT the micro-batch mean), so
            micro-batch losses summed over the optimiser step equal the full-batch loss.
        per_pair_B: Per-pair loss L_i, with grad.
        margin_B: The loss's own preference margin, detached.
        chosen_reward_B: Implicit reward of the chosen response, detached.
        rejected_reward_B: Implicit reward of the rejected response, detached.
    """

    loss: Tensor
    per_pair_B: Tensor
    margin_B: Tensor
    chosen_reward_B: Tensor
    rejected_reward_B: Tensor


@runtime_checkable
class PreferenceLoss(Protocol):
    """A pairwise preference loss written as a function of a per-pair margin.

    `margin()` and `pair_loss()` are separate so MetaAPO can compute offline and online
    margins, mix `w * L(m_off) + (1 - w) * L(m_on)` and feed the meta-learner, all with the
    same definitions the plain loss uses.
    """

    name: str
    needs_reference: bool

    def margin(self, logps: PairLogps) -> Tensor:
        """Per-pair margin m_B, with grad (no `validate()`; `__call__` validates)."""
        ...

    def pair_loss(self, margin_B: Tensor) -> Tensor:
        """Elementwise per-pair loss L(m)."""
        ...

    def __call__(self, logps: PairLogps, num_pairs_global: int) -> LossOutput:
        """Loss of a micro-batch, normalised by the global pair count of the step."""
        ...


def check_positive(loss_name: str, **values: float) -> None:
    """Raise ValueError unless every given hyper-parameter is > 0."""
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{loss_name}: {key} must be > 0, got {value}")


def check_num_pairs_global(num_pairs_global: int) -> int:
    """Return `num_pairs_global` as an int; raise ValueError unless it is an integer >= 1."""
    try:
        if isinstance(num_pairs_global, bool):
            raise TypeError
        count = operator.index(num_pairs_global)  # int, numpy int, integer 0-d tensor
    except TypeError:
        raise ValueError(
            f"num_pairs_global must be an integer, got {type(num_pairs_global).__name__}"
        ) from None
    if count < 1:
        raise ValueError(
            "num_pairs_global must be >= 1 (pairs in the whole optimiser step across "
            f"micro-batches and data-parallel ranks), got {num_pairs_global}"
        )
    return count


def reference_logratios(logps: PairLogps, loss_name: str) -> tuple[Tensor, Tensor]:
    """Return (log pi/pi_ref of chosen, of rejected), each [B], with grad.

    Raises:
        ValueError: if the reference log-probs are missing.
    """
    if logps.ref_chosen_B is None or logps.ref_rejected_B is None:
        raise ValueError(
            f"loss '{loss_name}' needs reference log-probs but PairLogps.ref_chosen_B / "
            "ref_rejected_B are None; run the reference model or use a reference-free "
            "loss such as 'simpo'"
        )
    return (
        logps.policy_chosen_B - logps.ref_chosen_B,
        logps.policy_rejected_B - logps.ref_rejected_B,
    )


def normalise(per_pair_B: Tensor, num_pairs_global: int) -> Tensor:
    """Sum the per-pair losses and divide by the global pair count of the optimiser step.

    Dividing by the global count (not by B) makes the losses and gradients summed over
    the micro-batches and data-parallel ranks of one step equal the mean over the whole
    step, for any split. The data-parallel reduction must therefore SUM gradients; if it
    averages over the DP size instead, the caller scales the loss by that size.
    """
    return per_pair_B.sum() / check_num_pairs_global(num_pairs_global)


def make_output(
    per_pair_B: Tensor,
    num_pairs_global: int,
    margin_B: Tensor,
    chosen_reward_B: Tensor,
    rejected_reward_B: Tensor,
) -> LossOutput:
    """Build a LossOutput with the global normalisation and detached diagnostics."""
    return LossOutput(
        loss=normalise(per_pair_B, num_pairs_global),
        per_pair_B=per_pair_B,
        margin_B=margin_B.detach(),
        chosen_reward_B=chosen_reward_B.detach(),
        rejected_reward_B=rejected_reward_B.detach(),
    )


__all__ = [
    "LossOutput",
    "PairLogps",
    "PreferenceLoss",
    "check_num_pairs_global",
    "check_positive",
    "make_output",
    "normalise",
    "reference_logratios",
]
