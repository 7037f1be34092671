"""THD `PackedSeqParams` for packed rows on the Transformer Engine spec (GPU).

On the TE spec a packed micro-batch is one token stream (``qkv_format="thd"``): the rows
of the micro-batch are concatenated, and ``cu_seqlens`` tells TE's fused attention (and
its fused RoPE, which then restarts positions per sequence) where each sequence starts.
The local CPU spec refuses these params (`DotProductAttention` asserts them away) and uses
a block-diagonal boolean mask instead (`metaapo_nemo.trainer.rows`); this module only
builds the metadata, which is unit-tested here and consumed by the GPU recipe.

Layout of the stream: row after row; inside a row the sequences in order, the row's
trailing padding appended to its last sequence. With ``pad_multiple`` > 1 (context
parallelism needs every sequence padded to a multiple of 2 * cp) each sequence is padded
up as well, and the padded offsets go to ``cu_seqlens_*_padded``:

    cu_seqlens          = [0, l_1, l_1 + l_2, ...]        real tokens (int32)
    cu_seqlens_padded   = [0, L_1, L_1 + L_2, ...]        offsets in the stream (int32)
    max_seqlen          = max L_i

Context parallelism (``parallel.cp`` > 1) splits every sequence slot into 2 * cp equal chunks;
CP rank r keeps chunks r and 2 * cp - 1 - r (the load-balanced split of Megatron and Transformer
Engine: causal attention's work per rank is then equal), sequence after sequence
(`cp_partition_index`). The THD metadata stays global: TE's attention and megatron's RoPE
divide each slot by cp themselves. The packer therefore pads every sequence to a multiple of
2 * cp (`metaapo_nemo.trainer.rows`), and its padding is part of the sequence (causal: real
tokens never see it, and it is never scored).

Shared-prompt rows are not expressible in THD (the rejected branch must skip the chosen
one inside a sequence); `rows.layout_from_config` refuses them on the TE spec.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def thd_offsets(row_blocks: Sequence[Sequence[int]], row_length: int,
                pad_multiple: int = 1) -> tuple[list[int], list[int]]:
    """Sequence lengths (real, padded) of the THD stream of a packed micro-batch.

    Args:
        row_blocks: Per row, the token count of each sequence in it (`MicroBatch.extras`
            ``"row_blocks"`` of a packed micro-batch), in row order.
        row_length: T, the length every row is padded to.
        pad_multiple: Each sequence's slot is padded to a multiple of this.

    Returns:
        (real lengths, padded lengths), one entry per sequence; the padded lengths of a
        row sum to its share of the stream (``row_length`` rounded up to ``pad_multiple``).

    Raises:
        ValueError: If a row holds more than ``row_length`` tokens or a sequence is empty.
    """
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple={pad_multiple} must be >= 1")
    real: list[int] = []
    padded: list[int] = []
    for r, blocks in enumerate(row_blocks):
        if not blocks or min(blocks) < 1:
            raise ValueError(f"row {r}: every sequence needs >= 1 token, got {list(blocks)}")
        if sum(blocks) > row_length:
            raise ValueError(f"row {r} holds {sum(blocks)} tokens > row_length={row_length}")
        slots = [-(-n // pad_multiple) * pad_multiple for n in blocks]
        room = -(-row_length // pad_multiple) * pad_multiple - sum(slots)
        if room < 0:
            raise ValueError(f"row {r}: padding each sequence to a multiple of {pad_multiple} "
                             f"needs {sum(slots)} > {row_length} tokens; raise the row length")
        slots[-1] += room  # the row's trailing padding belongs to its last sequence's slot
        real += list(blocks)
        padded += slots
    return real, padded


def thd_packed_seq_params(row_blocks: Sequence[Sequence[int]], row_length: int,
                          pad_multiple: int = 1, device: torch.device | str = "cpu"):
    """megatron's `PackedSeqParams` (qkv_format "thd") for a packed micro-batch.

    See `thd_offsets` for the arguments. ``cu_seqlens_*_padded`` is always set (it carries
    each row's trailing padding), equal to ``cu_seqlens_*`` where nothing is padded.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    real, padded = thd_offsets(row_blocks, row_length, pad_multiple)
    cu = torch.zeros(len(real) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.tensor(real, dtype=torch.int32).cumsum(0)
    cu_padded = torch.zeros_like(cu)
    cu_padded[1:] = torch.tensor(padded, dtype=torch.int32).cumsum(0)
    longest = max(padded)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def cp_partition_index(slot_lengths: Sequence[int], cp: int, cp_rank: int) -> torch.Tensor:
    """Stream indices of the tokens CP rank ``cp_rank`` holds, in its local order.

    Every slot (a sequence with its padding) is cut into ``2 * cp`` equal chunks; the rank
    keeps chunk ``cp_rank`` and chunk ``2 * cp - 1 - cp_rank`` of each slot, in slot order.
    This is the order megatron's THD RoPE (``_get_thd_freqs_on_this_cp_rank``) and Transformer
    Engine's ``thd_get_partitioned_indices`` assume.

    Raises:
        ValueError: If a slot's length is not a multiple of ``2 * cp``.
    """
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank={cp_rank} outside 0..{cp - 1}")
    parts: list[torch.Tensor] = []
    start = 0
    for i, length in enumerate(slot_lengths):
        if length % (2 * cp):
            raise ValueError(
                f"sequence slot {i} has {length} tokens, not a multiple of 2 x cp = {2 * cp}: context "
                "parallelism needs every packed sequence padded to it (RowLayout.seq_multiple)")
        chunk = length // (2 * cp)
        for c in (cp_rank, 2 * cp - 1 - cp_rank):
            parts.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
        start += length
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
