"""The offline DPO family (DPO, IPO, SimPO, KTO) as an algorithm of the one loop.

Per epoch the pairs are cut into seeded global batches; each step takes this DP rank's
slice, fills the reference cache for pairs it has never seen (or once per pass with
`reference.precompute`), collates them in the configured `RowLayout` and trains the
configured preference loss over the GLOBAL pair count.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from metaapo_nemo.config.schema import Config
from metaapo_nemo.trainer.algorithm import StepWork
from metaapo_nemo.trainer.batching import global_batches, rank_slice, steps_per_epoch, to_microbatches
from metaapo_nemo.trainer.callbacks import TrainState
from metaapo_nemo.trainer.metrics import reduce_stats
from metaapo_nemo.trainer.preference import finalize_stats, kl_estimate_from, policy_loss_fn, sum_stats


@dataclass
class EpochPosition:
    """Where an offline run is: the epoch and the global batches of it already trained."""

    epoch: int = 0
    next_batch: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


def total_steps(num_pairs: int, cfg: Config) -> int:
    from metaapo_nemo.trainer.setup import total_steps as steps

    return steps(num_pairs, cfg)


@dataclass
class OfflinePreference:
    """DPO / IPO / SimPO / KTO on the run's offline pairs (`run` is the built `Run`)."""

    run: Any
    name: str = "dpo"

    def __post_init__(self) -> None:
        self.pos = EpochPosition()
        self._batches: list | None = None

    # ------------------------------------------------------------------ protocol
    def stateful(self) -> dict:
        return {"position": ("trainer", self.pos)}

    def callbacks(self) -> list[object]:
        return []

    def begin(self, st: TrainState, resumed: bool) -> None:
        st.epoch = self.pos.epoch

    def end(self, st: TrainState) -> None:
        pass

    def close(self) -> None:
        pass

    def next_step(self, st: TrainState) -> StepWork | None:
        r, pos = self.run, self.pos
        while True:
            if pos.epoch >= r.cfg.train.epochs:
                return None
            if self._batches is None:
                self._start_epoch()
            if pos.next_batch < len(self._batches):
                break
            pos.epoch, pos.next_batch, self._batches = pos.epoch + 1, 0, None
        st.epoch = pos.epoch
        t0 = time.perf_counter()
        batch = self._batches[pos.next_batch]
        pos.next_batch += 1  # consumed, whether the step applies or is skipped
        mine = rank_slice(batch, r.plan, r.ctx.dp_rank)
        self.fill_reference(mine)  # per step: only pairs never seen by this reference
        mbs = to_microbatches(mine, r.plan.micro_batch, r.pad_id, r.ctx.device, r.layout)
        if r.reference is not None:
            r.ref_cache.attach(mbs, r.ctx.is_last_stage)
        prev = st.metrics

        def skipped(metrics: dict) -> None:  # the KTO reference point stays the last good step's
            metrics["logratio"] = prev.get("logratio", 0.0)

        return StepWork(
            mbs, policy_loss_fn(r.loss, r.plan.global_batch, kl_estimate_from(prev)),
            metrics=lambda outs: finalize_stats(reduce_stats(sum_stats(outs), r.ctx)),
            units=r.plan.global_batch, info={"epoch": pos.epoch}, on_skip=skipped, started=t0)

    # ------------------------------------------------------------------ pieces
    def _start_epoch(self) -> None:
        r = self.run
        cfg = r.cfg
        self._batches = list(global_batches(r.pairs, r.plan.global_batch, cfg.run.seed, self.pos.epoch,
                                            cfg.data.shuffle))
        assert len(self._batches) == steps_per_epoch(len(r.pairs), r.plan.global_batch)
        if cfg.reference.precompute:  # the whole pass up front (a no-op once cached)
            self.fill_reference([p for b in self._batches for p in rank_slice(b, r.plan, r.ctx.dp_rank)])

    def fill_reference(self, pairs: list) -> None:
        """Reference log-probs of the given pairs that the cache does not hold yet."""
        r = self.run
        missing = r.ref_cache.missing(pairs)
        if r.reference is None or not missing:
            return
        mbs = to_microbatches(missing, r.plan.micro_batch, r.pad_id, r.ctx.device, r.layout)
        r.ref_cache.fill(r.reference, mbs)
