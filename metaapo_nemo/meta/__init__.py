"""MetaAPO meta-learner, adaptive sampling decisions and the T_meta callback."""

from metaapo_nemo.meta.callback import MetaUpdateCallback
from metaapo_nemo.meta.learner import MetaBuffer, MetaLearner, MetaNet, MetaSettings, meta_input
from metaapo_nemo.meta.sampling import sampling_uniforms, select_for_sampling

__all__ = [
    "MetaBuffer",
    "MetaLearner",
    "MetaNet",
    "MetaSettings",
    "MetaUpdateCallback",
    "meta_input",
    "sampling_uniforms",
    "select_for_sampling",
]
