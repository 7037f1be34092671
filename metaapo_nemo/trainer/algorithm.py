"""The seam between the ONE training loop (`trainer.loop`) and each method (`metaapo_nemo.algorithms`).

A method (offline DPO family, MetaAPO with its baselines and ablations) is an object with a
handful of methods; the loop owns the step body (zero grads -> Megatron forward/backward
schedule -> non-finite check -> optimiser step -> metrics -> callbacks -> checkpoint /
preemption) and asks the algorithm only for what differs:

    begin(state, resumed)      once, after a checkpoint (if any) was loaded into `stateful()`
    next_step(state)           this rank's micro-batches + loss of the next optimiser step,
                               or None when the data is used up (round/epoch hooks run here)
    end(state)                 once after the last step (not after a preemption)
    stateful()                 name -> (where, object with state_dict/load_state_dict),
                               registered once with the checkpointer
    callbacks()                extra loop callbacks (e.g. the meta-learner's T_meta step)
    close()                    releases engines

Where: "trainer" (JSON, one copy), "rank" (torch, one file per rank), "shared" (torch, one
copy written by the main rank).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from metaapo_nemo.models.microbatch import MicroBatch
from metaapo_nemo.trainer.callbacks import TrainState

LossFn = Callable[[MicroBatch, Any], tuple[Any, dict[str, Any]]]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StepWork:
    """One optimiser step as the algorithm prepared it for this rank.

    Attributes:
        microbatches: This rank's micro-batches (every pipeline stage gets the same list).
        loss_fn: The last-stage loss callback (loss already divided by the GLOBAL count).
        metrics: Per-micro-batch last-stage stats -> the step's global metrics (collective:
            every rank calls it).
        units: Pairs / prompts in the global step (for pairs_per_s).
        info: Fields added to the step's metrics (e.g. epoch, round).
        on_skip: Called with the metrics when the step is skipped (non-finite): undo what
            the step recorded.
        started: When the step's preparation began (step_time counts data + reference).
    """

    microbatches: Sequence[MicroBatch]
    loss_fn: LossFn
    metrics: Callable[[list[dict[str, Any]]], dict[str, float]]
    units: int
    info: dict[str, Any] = field(default_factory=dict)
    on_skip: Callable[[dict[str, float]], None] | None = None
    started: float = field(default_factory=time.perf_counter)


class Algorithm(Protocol):
    name: str

    def begin(self, state: TrainState, resumed: bool) -> None: ...

    def next_step(self, state: TrainState) -> StepWork | None: ...

    def end(self, state: TrainState) -> None: ...

    def stateful(self) -> dict[str, tuple[str, Stateful]]: ...

    def callbacks(self) -> list[object]: ...

    def close(self) -> None: ...
