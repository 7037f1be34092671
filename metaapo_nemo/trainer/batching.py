"""Global batches -> this data-parallel rank's micro-batches.

A global batch of G pairs (one optimiser step) is split evenly over the D data-parallel
ranks (contiguous slices, so the split is the same on every rank without communication)
and each rank's G/D pairs into micro-batches of m pairs. A pair's chosen and rejected rows
are always adjacent in the same micro-batch (rows 2i, 2i+1), so they are never separated
by micro-batching, pipeline schedules or DP sharding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from metaapo_nemo.data.collate import collate_pairs, epoch_order
from metaapo_nemo.data.preference import TokenizedPair
from metaapo_nemo.models.policy import MicroBatch


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


def rank_microbatches(
    batch: Sequence[TokenizedPair], plan: StepPlan, dp_rank: int, pad_id: int, device: torch.device
) -> list[MicroBatch]:
    """This DP rank's slice of a global batch, collated into micro-batches."""
    mine = batch[dp_rank * plan.per_rank:(dp_rank + 1) * plan.per_rank]
    out = []
    for start in range(0, len(mine), plan.micro_batch):
        group = mine[start:start + plan.micro_batch]
        pb = collate_pairs(group, pad_id=pad_id)
        out.append(
            MicroBatch(
                input_ids_NT=pb.input_ids_NT.to(device),
                labels_NT=pb.labels_NT.to(device),
                loss_mask_NT=pb.loss_mask_NT.to(device),
                extras={
                    "pair_index": torch.tensor([p.index for p in group], device=device),
                    "tokens": sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in group),
                },
            )
        )
    return out
