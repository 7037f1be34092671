"""vLLM's log lines during a bucketed weight push: its false alarms dropped, its one true
alarm (a weight that NO bucket loaded) kept for the push to report once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.inplace"
_NOT_LOADED = "Following weights were not loaded from checkpoint"
# The same per-bucket false alarm, per layer and by class name only ("RMSNorm: Failed to load
# weights": a layer of no weight in this bucket keeps its tensors): dropped during a push, whose
# by-name check (`_UnloadedWeights.never_loaded`) covers every weight.
_LAYERWISE_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
_LAYER_NOT_LOADED = "%s: Failed to load weights"


def _drop_layer_not_loaded(record: logging.LogRecord) -> bool:
    return record.msg != _LAYER_NOT_LOADED


class _UnloadedWeights(logging.Filter):
    """Collects vLLM's per-reload "weights were not loaded" sets during one bucketed push.

    A bucket carries a subset of the weights by design, so vLLM's in-place reload names every
    other weight, once per bucket (a wall of false alarms in every log). Only a weight that NO
    bucket of the push loaded is a problem: `never_loaded` (the intersection), which the push
    reports once itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sets: list[set[str]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_NOT_LOADED) and record.args:
            self.sets.append({str(n) for n in record.args[0]})
            return False
        return True

    def never_loaded(self, buckets: int) -> set[str]:
        """Weights missing from every one of `buckets` reloads (a silent reload loaded all)."""
        if not self.sets or len(self.sets) < buckets:
            return set()
        return set.intersection(*self.sets)


@contextmanager
def quiet_push() -> Iterator[_UnloadedWeights]:
    """During one push: vLLM's per-bucket "not loaded" sets are collected (not logged) and
    its per-layer lines dropped; yields the collector (`never_loaded(buckets)` after it)."""
    unloaded = _UnloadedWeights()
    reload_log, layer_log = logging.getLogger(_RELOAD_LOGGER), logging.getLogger(_LAYERWISE_LOGGER)
    reload_log.addFilter(unloaded)
    layer_log.addFilter(_drop_layer_not_loaded)
    try:
        yield unloaded
    finally:
        reload_log.removeFilter(unloaded)
        layer_log.removeFilter(_drop_layer_not_loaded)
