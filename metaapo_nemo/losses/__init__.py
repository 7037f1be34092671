"""Preference losses (DPO, IPO, SimPO, KTO) behind one `PreferenceLoss` call shape.

Build one by name with `build_loss("dpo", beta=0.1)`; see `base` for the contract and the
global-pair-count normalisation shared by every loss.
"""

from metaapo_nemo.losses.base import LossOutput, PairLogps, PreferenceLoss
from metaapo_nemo.losses.dpo import DPOLoss
from metaapo_nemo.losses.ipo import IPOLoss
from metaapo_nemo.losses.kto import KTOLoss
from metaapo_nemo.losses.registry import LOSSES, build_loss, loss_params
from metaapo_nemo.losses.simpo import SimPOLoss

__all__ = [
    "LOSSES",
    "DPOLoss",
    "IPOLoss",
    "KTOLoss",
    "LossOutput",
    "PairLogps",
    "PreferenceLoss",
    "SimPOLoss",
    "build_loss",
    "loss_params",
]
