"""Batching preference pairs into padded tensors, and the per-epoch order.

Shape legend: B = pairs in the batch, N = 2 * B sequences (row 2i is the chosen response
of pair i, row 2i + 1 its rejected response), T = padded sequence length.

Each row is ``[prompt | response]`` right-padded with the pad id. Targets are the next
tokens (``labels[:, t] = input_ids[:, t + 1]``) and the loss mask is 1.0 exactly where the
target is a response token, so the sum of ``loss_mask * logp(labels)`` over T is the
sequence log-prob log pi(y | x) of the response (eos included when it was not cut).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from metaapo_nemo.data.preference import TokenizedPair


@dataclass(frozen=True)
class PairBatch:
    """A padded batch of chosen/rejected sequences; the pair of row 2i + 1 is row 2i.

    Attributes:
        input_ids_NT: ``[prompt | response]`` token ids, right-padded with ``pad_id``.
        labels_NT: Next-token targets: ``labels[:, t] = input_ids[:, t + 1]``; the last
            column and the padding hold ``pad_id``.
        loss_mask_NT: 1.0 where ``labels[:, t]`` is a response token, else 0.0.
        num_pairs: B, the number of pairs (N = 2 * B).
        pad_id: The padding id used in ``input_ids_NT`` and ``labels_NT``.
        indices_B: Source row index of each pair (`TokenizedPair.index`).
    """

    input_ids_NT: torch.Tensor
    labels_NT: torch.Tensor
    loss_mask_NT: torch.Tensor
    num_pairs: int
    pad_id: int
    indices_B: tuple[int, ...] = ()

    @property
    def response_lengths_N(self) -> torch.Tensor:
        """Number of response tokens per row (float, from the loss mask)."""
        return self.loss_mask_NT.sum(-1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PairBatch:
        """Returns a copy with the tensors on ``device``."""
        return PairBatch(
            input_ids_NT=self.input_ids_NT.to(device, non_blocking=non_blocking),
            labels_NT=self.labels_NT.to(device, non_blocking=non_blocking),
            loss_mask_NT=self.loss_mask_NT.to(device, non_blocking=non_blocking),
            num_pairs=self.num_pairs, pad_id=self.pad_id, indices_B=self.indices_B)

    def validate(self) -> None:
        """Checks shapes, dtypes and the label/mask contract.

        Raises:
            ValueError: If any part of the contract in the class docstring is broken.
        """
        n = 2 * self.num_pairs
        ids, labels, mask = self.input_ids_NT, self.labels_NT, self.loss_mask_NT
        if ids.dim() != 2 or ids.shape[0] != n or ids.shape[1] < 2:
            raise ValueError(f"input_ids_NT has shape {tuple(ids.shape)}; expected "
                             f"[2 * num_pairs = {n}, T >= 2]")
        if labels.shape != ids.shape or mask.shape != ids.shape:
            raise ValueError(f"shapes differ: input_ids {tuple(ids.shape)}, labels "
                             f"{tuple(labels.shape)}, loss_mask {tuple(mask.shape)}")
        if ids.dtype != torch.long or labels.dtype != torch.long or not mask.is_floating_point():
            raise ValueError(f"dtypes input_ids={ids.dtype} labels={labels.dtype} "
                             f"loss_mask={mask.dtype}; expected long, long, float")
        if self.indices_B and len(self.indices_B) != self.num_pairs:
            raise ValueError(f"{len(self.indices_B)} indices for {self.num_pairs} pairs")
        if not torch.equal(labels[:, :-1], ids[:, 1:]):
            raise ValueError("labels_NT[:, t] must equal input_ids_NT[:, t + 1]")
        if not bool((labels[:, -1] == self.pad_id).all()):
            raise ValueError(f"the last label column must be pad_id={self.pad_id}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("loss_mask_NT must hold only 0.0 and 1.0")
        if not bool((self.response_lengths_N > 0).all()):
            raise ValueError("every row needs at least one response token in the loss mask")


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int,
                  pad_to_multiple_of: int = 1) -> PairBatch:
    """Stacks pairs into one right-padded batch, chosen and rejected adjacent.

    Args:
        pairs: The pairs of the batch (B >= 1).
        pad_id: Id used for padding and for the targets of non-response positions.
        pad_to_multiple_of: Round T up to a multiple of this (e.g. 8 for tensor cores,
            the TP size for sequence parallelism).

    Returns:
        A validated `PairBatch` with N = 2 * len(pairs) rows.

    Raises:
        ValueError: If ``pairs`` is empty, ``pad_to_multiple_of < 1`` or a response is
            empty.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of} must be >= 1")
    rows: list[tuple[Sequence[int], Sequence[int], bool]] = []
    for pair in pairs:
        if not pair.chosen_ids or not pair.rejected_ids:
            raise ValueError(f"pair {pair.index} has an empty response")
        rows += [(pair.prompt_ids, pair.chosen_ids, True), (pair.prompt_ids, pair.rejected_ids, True)]
    input_ids, labels, loss_mask = pad_rows(rows, pad_id, pad_to_multiple_of)
    batch = PairBatch(input_ids, labels, loss_mask, num_pairs=len(pairs), pad_id=pad_id,
                      indices_B=tuple(pair.index for pair in pairs))
    batch.validate()
    return batch


def pad_rows(rows: Sequence[tuple[Sequence[int], Sequence[int], bool]], pad_id: int,
             pad_to_multiple_of: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt, response, scored)`` rows -> right-padded ``input_ids_NT, labels_NT, loss_mask_NT``.

    Each row is ``[prompt | response]``; labels are the next tokens; the loss mask is 1.0 where
    the target is a response token of a scored row (an unscored row, e.g. a placeholder, has
    none). T is the longest row rounded up to ``pad_to_multiple_of``.
    """
    longest = max(len(p) + len(r) for p, r, _ in rows)
    t = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), t), dtype=torch.float32)
    for i, (prompt, response, scored) in enumerate(rows):
        p, r = len(prompt), len(response)
        input_ids[i, : p + r] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        if scored:  # target at t is token t + 1: response tokens p .. p+r-1 are targets at p-1 .. p+r-2
            loss_mask[i, p - 1 : p + r - 1] = 1.0
    labels = torch.full_like(input_ids, pad_id)
    labels[:, :-1] = input_ids[:, 1:]
    return input_ids, labels, loss_mask


def split_pairs(pairs: Sequence[TokenizedPair], num_chunks: int) -> list[list[TokenizedPair]]:
    """Splits pairs into ``num_chunks`` contiguous chunks whose sizes differ by at most 1.

    Used for micro-batches: pairs stay whole, so chosen and rejected are never separated.

    Args:
        pairs: Pairs of one step.
        num_chunks: Number of chunks, 1 <= num_chunks <= len(pairs).

    Returns:
        The chunks in order; concatenated they give ``pairs``.

    Raises:
        ValueError: If ``num_chunks`` is out of range.
    """
    if not 1 <= num_chunks <= len(pairs):
        raise ValueError(f"cannot split {len(pairs)} pairs into {num_chunks} non-empty chunks")
    size, extra = divmod(len(pairs), num_chunks)
    chunks, start = [], 0
    for i in range(num_chunks):
        stop = start + size + (i < extra)
        chunks.append(list(pairs[start:stop]))
        start = stop
    return chunks


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of ``range(num_items)``, different for each epoch.

    Uses a private CPU `torch.Generator`, so every rank and every resume computes the same
    order without touching the global RNG. Its seed is a hash of ``(seed, epoch)`` folded to
    32 bits: the CPU generator (mt19937) silently ignores seed bits above 32, so
    ``seed * 2**32 + epoch`` would give every seed the same orders.

    Args:
        num_items: Length of the permutation.
        seed: Run seed, 0 <= seed < 2**32.
        epoch: Epoch number, 0 <= epoch < 2**32.

    Returns:
        The permutation as a list of ints.

    Raises:
        ValueError: If an argument is out of range.
    """
    if num_items < 0:
        raise ValueError(f"num_items={num_items} must be >= 0")
    if not (0 <= seed < 2**32 and 0 <= epoch < 2**32):
        raise ValueError(f"seed={seed} and epoch={epoch} must be in [0, 2**32)")
    generator = torch.Generator(device="cpu")
    digest = hashlib.sha256(f"epoch_order/{seed}/{epoch}".encode()).digest()
    generator.manual_seed(int.from_bytes(digest[:4], "little"))
    return torch.randperm(num_items, generator=generator).tolist()
