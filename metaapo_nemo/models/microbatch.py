"""The micro-batch contract between row layouts, the model engine and the losses.

Legend: N rows, T positions, Q logical sequences (2 per pair: 2i chosen, 2i+1 rejected),
K scored positions (loss_mask > 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch


@dataclass
class MicroBatch:
    """One micro-batch: token tensors, the row layout, per-row extras (e.g. reference log-probs).

    Legend: N rows, T positions, Q logical sequences (2 per pair: 2i chosen, 2i+1 rejected).
    In the plain layout row n IS sequence n (Q = N, causal attention, positions 0..T-1).
    Packed and shared-prompt rows (`metaapo_nemo.trainer.rows`) hold several sequences or
    a prompt with several responses per row; then the optional fields say which token
    belongs where:

    Attributes:
        attention_mask_N1TT: boolean, True = masked (megatron's convention); None = causal.
        position_ids_NT: RoPE position of each token; None = 0..T-1 in every row. Needs a
            model built with `BuildOptions(explicit_positions=True)`.
        seq_index_NT: the logical sequence whose response token is the TARGET at (n, t)
            (meaningful where loss_mask > 0); None = row n is sequence n.
        num_seqs: Q when `seq_index_NT` is set.
        select_logits: run the output layer only on positions with loss_mask > 0 (the
            prompt and padding positions never need logits).
        cp_group: Set on a context-parallel rank's share of a THD row (`cp_shard`): the
            sequence sums and lengths are then all-reduced over this group.
        padding_NT: True where a position holds no token of any sequence (row padding, a
            placeholder, a sequence's context-parallel tail); None = none. Mixture-of-experts
            models keep these out of the router's load-balancing loss.
    """

    input_ids_NT: torch.Tensor
    labels_NT: torch.Tensor
    loss_mask_NT: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    attention_mask_N1TT: torch.Tensor | None = None
    position_ids_NT: torch.Tensor | None = None
    seq_index_NT: torch.Tensor | None = None
    num_seqs: int | None = None
    select_logits: bool = False
    cp_group: Any = None
    padding_NT: torch.Tensor | None = None

    def sequence_logps(self, logps_NT: torch.Tensor) -> torch.Tensor:
        """Summed response log-prob of each logical sequence -> [Q]."""
        if self.seq_index_NT is None:
            return (logps_NT * self.loss_mask_NT).sum(dim=-1)  # plain rows: unchanged numerics
        sel = self.loss_mask_NT > 0
        out = logps_NT.new_zeros(self._num_seqs())
        return _cp_sum(out.index_add(0, self.seq_index_NT[sel], (logps_NT * self.loss_mask_NT)[sel]),
                       self.cp_group)

    def sequence_lengths(self) -> torch.Tensor:
        """Response tokens of each logical sequence (float) -> [Q]."""
        if self.seq_index_NT is None:
            return self.loss_mask_NT.sum(dim=-1)
        sel = self.loss_mask_NT > 0
        out = self.loss_mask_NT.new_zeros(self._num_seqs())
        return _cp_sum(out.index_add(0, self.seq_index_NT[sel], self.loss_mask_NT[sel]), self.cp_group)

    def cp_shard(self, cp: int, cp_rank: int, group: Any) -> "MicroBatch":
        """This context-parallel rank's share of a THD-packed row (`models.packed_seq`).

        Every sequence slot is cut into 2 x cp chunks and the rank keeps two of them
        (`cp_partition_index`); the THD metadata stays that of the whole row (its length goes
        to ``extras["thd_length"]``), and the per-sequence sums are reduced over ``group``.
        """
        from metaapo_nemo.models.packed_seq import cp_partition_index, thd_offsets

        blocks = self.extras.get("row_blocks")
        n, t = self.input_ids_NT.shape
        if self.attention_mask_N1TT is not None or not blocks or n != 1 or self.seq_index_NT is None:
            raise ValueError("context parallelism splits THD-packed rows only (one row, no mask, "
                             "extras['row_blocks'], seq_index_NT); this micro-batch is not one")
        _, slots = thd_offsets(blocks, t)
        idx = cp_partition_index(slots, cp, cp_rank).to(self.input_ids_NT.device)

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.index_select(-1, idx.to(x.device))

        return replace(self, input_ids_NT=pick(self.input_ids_NT), labels_NT=pick(self.labels_NT),
                       loss_mask_NT=pick(self.loss_mask_NT), position_ids_NT=pick(self.position_ids_NT),
                       seq_index_NT=pick(self.seq_index_NT), padding_NT=pick(self.padding_NT),
                       extras={**self.extras, "thd_length": t}, cp_group=group)

    def _num_seqs(self) -> int:
        if self.num_seqs is None:
            raise ValueError("MicroBatch.seq_index_NT is set but num_seqs is not")
        return self.num_seqs

    def padded_to(self, length: int, pad_id: int) -> "MicroBatch":
        """Right-pads to `length` (pipeline stages exchange fixed-shape activations).

        New positions are padding: masked from every other token, attending to themselves.
        """
        extra = length - self.input_ids_NT.shape[1]
        if extra == 0:
            return self
        if extra < 0:
            raise ValueError(f"micro-batch of length {self.input_ids_NT.shape[1]} > {length}")
        pad = partial(torch.nn.functional.pad, pad=(0, extra))
        mask = self.attention_mask_N1TT
        if mask is not None:
            mask = torch.nn.functional.pad(mask, (0, extra, 0, extra), value=True)
            idx = torch.arange(length - extra, length, device=mask.device)
            mask[..., idx, idx] = False
        return replace(
            self,
            input_ids_NT=pad(self.input_ids_NT, value=pad_id),
            labels_NT=pad(self.labels_NT, value=pad_id),
            loss_mask_NT=pad(self.loss_mask_NT, value=0.0),
            attention_mask_N1TT=mask,
            position_ids_NT=None if self.position_ids_NT is None else pad(self.position_ids_NT, value=0),
            seq_index_NT=None if self.seq_index_NT is None else pad(self.seq_index_NT, value=-1),
            padding_NT=pad(self.padding_NT if self.padding_NT is not None else
                           torch.zeros_like(self.input_ids_NT, dtype=torch.bool), value=True),
        )


@dataclass(frozen=True)
class Selection:
    """Positions whose logits are needed: K (row, position) pairs with loss_mask > 0."""

    hidden_idx_K: torch.Tensor  # into the model's [T, N] flattened hidden states: t * N + n
    dense_idx_K: torch.Tensor  # into a row-major [N, T] tensor: n * T + t
    labels_K: torch.Tensor

    @staticmethod
    def of(mb: MicroBatch) -> "Selection":
        n_idx, t_idx = (mb.loss_mask_NT > 0).nonzero(as_tuple=True)
        n, t = mb.loss_mask_NT.shape
        order = torch.argsort(t_idx * n + n_idx)  # hidden-state order; any fixed order works
        n_idx, t_idx = n_idx[order], t_idx[order]
        return Selection(t_idx * n + n_idx, n_idx * t + t_idx, mb.labels_NT[n_idx, t_idx])


class OutputSelector:
    """Forward pre-hook on the output layer: keeps only the selected hidden states.

    The output layer then returns [K, 1, V/tp] logits, which GPTModel hands back as
    [1, K, V/tp]. Set `idx` around one model call; None = every position (plain).
    """

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None

    def __call__(self, module, args, kwargs):
        if self.idx is None:
            return None
        hidden = args[0]
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.idx).unsqueeze(1)
        return (picked, *args[1:]), kwargs


def _cp_sum(partial_Q: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum of the CP ranks' partial sums; the gradient flows to this rank's part only.

    ``full + (partial - partial.detach())`` has exactly the value of the all-reduced sum on
    every rank (x - x == 0), so the ranks compute the same loss; each rank's backward then
    covers its own tokens, and megatron's gradient all-reduce over data x context parallel
    ranks adds the parts up.
    """
    if group is None:
        return partial_Q
    import torch.distributed as dist

    full = partial_Q.detach().clone()
    dist.all_reduce(full, group=group)
    return full + (partial_Q - partial_Q.detach()) if partial_Q.requires_grad else full
