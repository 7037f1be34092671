"""Global batches -> this data-parallel rank's micro-batches.

A global batch of G pairs (one optimiser step) is split evenly over the D data-parallel
ranks (contiguous slices, so the split is the same on every rank without communication)
and each rank's G/D pairs into micro-batches in a `RowLayout` (m pairs per micro-batch when
padded or bucketed, a token budget per row when packed). A pair's chosen and rejected
sequences always sit in the same micro-batch, so they are never separated by
micro-batching, pipeline schedules or DP sharding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch.profiler import record_function

from metaapo_nemo.data.collate import epoch_order
from metaapo_nemo.data.preference import TokenizedPair
from metaapo_nemo.models.policy import MicroBatch
from metaapo_nemo.trainer.rows import RowLayout, build_microbatches


@dataclass(frozen=True)
class StepPlan:
    """How one optimiser step's pairs are split."""

    global_batch: int
    micro_batch: int
    dp_size: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.dp_size

    @property
    def grad_accum(self) -> int:
        return self.per_rank // self.micro_batch

    def validate(self) -> None:
        if self.global_batch % (self.micro_batch * self.dp_size):
            raise ValueError(
                f"train.global_batch_size={self.global_batch} is not divisible by "
                f"train.micro_batch_size={self.micro_batch} x data-parallel size {self.dp_size} "
                f"= {self.micro_batch * self.dp_size}"
            )


def steps_per_epoch(num_pairs: int, global_batch: int) -> int:
    """Full global batches per pass; the incomplete tail batch is dropped."""
    return num_pairs // global_batch


def global_batches(
    pairs: Sequence[TokenizedPair], global_batch: int, seed: int, epoch: int, shuffle: bool
) -> Iterator[list[TokenizedPair]]:
    """Yields the epoch's global batches in a seeded order (identical on every rank)."""
    order = epoch_order(len(pairs), seed, epoch) if shuffle else list(range(len(pairs)))
    for start in range(0, steps_per_epoch(len(pairs), global_batch) * global_batch, global_batch):
        yield [pairs[i] for i in order[start:start + global_batch]]


def rank_slice(batch: Sequence[TokenizedPair], plan: StepPlan, dp_rank: int) -> list[TokenizedPair]:
    """This DP rank's contiguous share of a global batch."""
    return list(batch[dp_rank * plan.per_rank:(dp_rank + 1) * plan.per_rank])


def to_microbatches(
    pairs: Sequence[TokenizedPair],
    micro_pairs: int,
    pad_id: int,
    device: torch.device,
    layout: RowLayout | None = None,
) -> list[MicroBatch]:
    """Pairs of one rank -> micro-batches on `device`.

    Args:
        pairs: The pairs (e.g. this rank's share of a step, or the uncached ones).
        micro_pairs: Pairs per micro-batch for the "pad" and "bucket" layouts.
        pad_id: Padding token id.
        device: Where the tensors go.
        layout: Row layout (`metaapo_nemo.trainer.rows`); None = "pad", one sequence per
            row in data order (the reference path).
    """
    with record_function("data"):
        mbs = build_microbatches(pairs, layout or RowLayout(), micro_pairs, pad_id)
        return [_to(mb, device) for mb in mbs]


def rank_microbatches(
    batch: Sequence[TokenizedPair],
    plan: StepPlan,
    dp_rank: int,
    pad_id: int,
    device: torch.device,
    layout: RowLayout | None = None,
) -> list[MicroBatch]:
    """This DP rank's slice of a global batch, collated into micro-batches (`to_microbatches`)."""
    return to_microbatches(rank_slice(batch, plan, dp_rank), plan.micro_batch, pad_id, device, layout)


def _to(mb: MicroBatch, device: torch.device) -> MicroBatch:
    move = lambda x: None if x is None else x.to(device)  # noqa: E731
    extras = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in mb.extras.items()}
    return replace(mb, input_ids_NT=mb.input_ids_NT.to(device), labels_NT=mb.labels_NT.to(device),
                   loss_mask_NT=mb.loss_mask_NT.to(device), extras=extras,
                   attention_mask_N1TT=move(mb.attention_mask_N1TT),
                   position_ids_NT=move(mb.position_ids_NT), seq_index_NT=move(mb.seq_index_NT))
