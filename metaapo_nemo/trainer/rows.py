"""Row layouts of preference micro-batches: padded, length-bucketed, packed, shared-prompt.

Legend: N rows, T positions per row, B units (prompts) in a micro-batch, R responses per
unit, Q = R * B logical sequences (sequence R*j + k is response k of the j-th unit).

A unit is one prompt with its responses (`Unit`): an offline DPO pair has R = 2 (chosen,
rejected); a MetaAPO round item has R = 4 (offline chosen, offline rejected, online chosen,
online rejected), its online responses absent (None) when the prompt was not sampled. A
unit is indivisible: all its responses land in the same micro-batch (and, when packed, in
the same row), so DPO pairs and MetaAPO rows go through the SAME layouts. An absent
response is a sequence with no scored token: a placeholder row ``[prompt | pad]`` (loss
mask 0) in the one-sequence-per-row layouts, nothing at all in the others. Layouts
(`RowLayout`):

- ``pad``: one sequence ``[prompt | response]`` per row, pairs in data order, right-padded
  to the micro-batch's longest row (`metaapo_nemo.data.collate.collate_pairs`).
- ``bucket``: as ``pad``, but the pairs of this rank's share of the step are sorted by
  length first, so a micro-batch holds pairs of similar length (less padding). The step's
  gradient is the same sum over the same pairs.
- ``pack``: pairs are packed first-fit-decreasing into rows of ``pack_tokens`` tokens (one
  row per micro-batch); the tokens of different sequences never see each other (block-
  diagonal causal mask) and every sequence has positions 0, 1, ... of its own.
- ``share_prompt``: each PAIR of a unit's responses becomes ONE sequence block
  ``[p_1 .. p_{P-1} | p_P c_1 .. c_C | p_P r_1 .. r_R]``: each branch sees the shared
  prompt prefix and itself, never its sibling branch, and both branches restart at position
  P-1. The last prompt token opens each branch because its output predicts that branch's
  first response token. P - 1 tokens per pair are computed once instead of twice. A DPO
  pair is one block (one row); a MetaAPO round item two (offline pair, online pair; a
  one-token placeholder row where the online pair is absent, so every micro-batch of a
  step has the same row count), not one row of four branches: attention and masks grow
  with the square of the row length (measured: 1.6x slower per token on CPU).

Layouts other than ``pad`` also set ``select_logits`` (the output layer runs only where a
response token is scored), and those with several sequences or branches per row carry the
mask, positions and target-to-sequence map the model and the loss need (see `MicroBatch`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from metaapo_nemo.data.collate import pad_rows
from metaapo_nemo.models.policy import MicroBatch

BATCHINGS = ("pad", "bucket", "pack")
# Row lengths under FP8 are multiples of this, so rows x T is too (`RowLayout.pad_multiple`).
FP8_TOKEN_MULTIPLE = 16

Response = tuple[int, ...] | None  # None: absent (a MetaAPO prompt without an online pair)


class Unit(Protocol):
    """What a row layout needs of a unit: `TokenizedPair` (R = 2) and MetaAPO's
    `RoundItem` (R = 4) both answer it."""

    @property
    def index(self) -> int: ...

    @property
    def prompt_ids(self) -> tuple[int, ...]: ...

    @property
    def responses(self) -> tuple[Response, ...]: ...


@dataclass(frozen=True)
class RowLayout:
    """How a rank's pairs become micro-batches (the `train.batching` config keys).

    Attributes:
        batching: "pad", "bucket" or "pack" (module docstring).
        share_prompt: One row block per pair with the prompt computed once.
        pack_tokens: Row length for "pack"; None = the longest pair of the step (the
            smallest row that fits every pair). A packed micro-batch is ONE row, so
            `train.micro_batch_size` does not apply and the micro-batch count varies.
        fixed_length: Pad every row to this many tokens (pipeline parallelism exchanges
            fixed shapes); None = each micro-batch's own longest row.
        fixed_rows: Keep a row for every absent response (padded layouts) or absent pair
            (shared prompt) so each micro-batch of a step has the same row count (pipeline
            parallelism exchanges fixed shapes). False: absent ones take no row at all, so a
            MetaAPO prompt without an online pair costs what a DPO pair costs (a row of
            padding costs a whole row). The plain "pad" layout without a shared prompt (the
            reference path: row n is sequence n) always keeps them.
        pad_multiple: Round every micro-batch's row length T up to a multiple of this
            (`FP8_TOKEN_MULTIPLE` under FP8: Transformer Engine's FP8 GEMMs assert that the
            flattened token count rows x T is a multiple of 8, and 16 where it is a GEMM's
            inner dimension in the weight gradient). The padding is masked out: log-probs
            and gradients do not change.
    """

    batching: str = "pad"
    share_prompt: bool = False
    pack_tokens: int | None = None
    fixed_length: int | None = None
    pad_multiple: int = 1
    fixed_rows: bool = True
    thd: bool = False  # packed rows as THD PackedSeqParams (module docstring of models/packed_seq.py)
    # THD only: every sequence is padded to a multiple of this (2 x cp under context
    # parallelism, which cuts each sequence into 2 x cp chunks); pad_multiple must be one of it.
    seq_multiple: int = 1

    def __post_init__(self) -> None:
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching={self.batching!r}; use one of {BATCHINGS}")
        if self.seq_multiple > 1 and not (self.thd and self.pad_multiple % self.seq_multiple == 0):
            raise ValueError(f"seq_multiple={self.seq_multiple} needs THD rows (thd=True) whose length "
                             f"multiple (pad_multiple={self.pad_multiple}) is a multiple of it")
        if self.pad_multiple < 1 or (self.fixed_length is not None and self.fixed_length % self.pad_multiple):
            raise ValueError(f"pad_multiple={self.pad_multiple} must be >= 1 and divide fixed_length="
                             f"{self.fixed_length}")

    @property
    def explicit_positions(self) -> bool:
        """Whether rows need per-token positions (a model built with explicit positions)."""
        return self.share_prompt or (self.batching == "pack" and not self.thd)

    def unit_tokens(self, unit: Unit) -> int:
        """Row tokens one unit's present responses occupy in this layout."""
        p, present = len(unit.prompt_ids), [r for r in unit.responses if r is not None]
        if self.share_prompt:  # one shared prompt per pair of responses
            pairs = len({j // 2 for j, r in enumerate(unit.responses) if r is not None})
            return pairs * (p - 1) + sum(len(r) + 1 for r in present)
        m = self.seq_multiple
        return sum(-(-(p + len(r)) // m) * m for r in present)


def layout_from_config(cfg, impl: str = "local") -> RowLayout:
    """The `RowLayout` of a `Config`'s train section for a layer implementation.

    Args:
        cfg: The validated config (`train.batching`, `share_prompt`, `pack_tokens`).
        impl: "local" (megatron's local spec: any boolean mask) or "transformer_engine".

    Raises:
        ValueError: For layouts the TE spec cannot run: its fused attention ignores an
            arbitrary mask, so shared-prompt rows and mask-packed rows would silently
            attend across sequences (packed rows go as THD `PackedSeqParams` there,
            `metaapo_nemo.models.packed_seq`); THD with shared prompts, with megatron's
            local attention, or with context parallelism.
    """
    t = cfg.train
    share = t.share_prompt if t.share_prompt is not None else impl == "local"
    thd = t.batching == "pack" and (t.pack_format == "thd" or (t.pack_format == "auto" and impl != "local"))
    if impl != "local" and share:
        raise ValueError(
            "train.share_prompt=true needs an arbitrary attention mask (each response sees its prompt, "
            "not its sibling), which the Transformer Engine spec's fused attention does not take; set "
            "train.share_prompt=false on GPU (train.batching=pack packs rows as THD there)"
        )
    if impl != "local" and t.batching == "pack" and not thd:
        raise ValueError(
            "train.pack_format=mask needs an arbitrary attention mask, which the Transformer Engine spec's "
            "fused attention does not take; use train.pack_format=thd (or auto) on GPU")
    if thd:
        if share:
            raise ValueError(
                "train.pack_format=thd cannot express shared-prompt rows (a branch must skip its sibling "
                "inside one sequence): set train.share_prompt=false, or train.pack_format=mask on the "
                "local (CPU) spec")
        if impl == "local" and t.attention != "sdpa":
            raise ValueError(
                "train.pack_format=thd on the local (CPU) spec needs train.attention=sdpa (megatron's "
                "local DotProductAttention takes no PackedSeqParams)")
    cp = cfg.parallel.cp
    if cp > 1 and not thd:
        raise ValueError(
            f"parallel.cp={cp}: context parallelism splits every sequence across the CP ranks, which "
            "the project does for THD-packed rows only (padded and mask-packed rows would need the "
            "split mask too); set train.batching=pack, train.pack_format=thd (or auto on GPU) and "
            "train.share_prompt=false" + (", with train.attention=sdpa on the local (CPU) spec"
                                          if impl == "local" else ""))
    fp8 = FP8_TOKEN_MULTIPLE if cfg.model.fp8 is not None else 1
    # Sequence parallelism splits a row's tokens over the TP ranks: a multiple of tp.
    tokens = math.lcm(fp8, cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
    # Under CP each rank holds T / cp tokens of a row: FP8's and SP's multiples apply to that
    # share, and every sequence (so every row) is a multiple of 2 x cp.
    multiple = tokens if cp == 1 else math.lcm(tokens * cp, 2 * cp)
    return RowLayout(t.batching, share, t.pack_tokens, pad_multiple=multiple,
                     fixed_rows=cfg.parallel.pp > 1, thd=thd, seq_multiple=2 * cp if cp > 1 else 1)


def describe_rows(cfg) -> str:
    """The dry run's line on how a step's rows are laid out, on the GPU's Transformer Engine
    spec and on the CPU's local spec, and why (or why a layout is refused there)."""
    parts = []
    for where, impl in (("Transformer Engine spec (GPU)", "transformer_engine"), ("local spec (CPU)", "local")):
        try:
            lay = layout_from_config(cfg, impl)
        except ValueError as exc:
            parts.append(f"{where}: refused ({exc})")
            continue
        if lay.batching == "pack":
            how = ("packed rows as THD PackedSeqParams (variable-length attention from cu_seqlens, RoPE "
                   "restarting per sequence: no padding, no cross-sequence attention)" if lay.thd else
                   "packed rows with a block-diagonal mask and per-sequence positions")
        else:
            how = {"pad": "one sequence per row, padded", "bucket": "one sequence per row, length-bucketed"}[
                lay.batching]
        if lay.share_prompt:
            how += ", each pair's prompt computed once (shared-prompt blocks)"
        if lay.seq_multiple > 1:
            how += (f", every sequence padded to a multiple of {lay.seq_multiple} and split over the "
                    f"parallel.cp={lay.seq_multiple // 2} ranks (2 load-balanced chunks each)")
        parts.append(f"{where}: {how}")
    return "rows: " + "; ".join(parts)


def data_tokens(unit: Unit) -> int:
    """Tokens of the unit's present responses as separate sequences ``[prompt | response]``
    (the throughput unit, whatever the layout)."""
    p = len(unit.prompt_ids)
    return sum(p + len(r) for r in unit.responses if r is not None)


# ----------------------------------------------------------------- one pair's token blocks


@dataclass
class _Block:
    """Tokens of one attention block (a sequence, or a shared-prompt pair) in row order."""

    ids: list[int]
    pos: list[int]
    # 0 = seen by every token of the block (prompt prefix, plain sequence); -1 = padding
    # (a placeholder, a context-parallel tail), seen by itself alone in mask rows
    branch: list[int]
    labels: list[int]
    seq: list[int]  # logical sequence of the target at each position; -1 = not scored


def _sequence_block(prompt: Sequence[int], response: Sequence[int], seq: int, pad_id: int) -> _Block:
    ids = list(prompt) + list(response)
    p, r = len(prompt), len(response)
    targets = [-1] * (p - 1) + [seq] * r + [-1]
    return _Block(ids, list(range(p + r)), [0] * (p + r), ids[1:] + [pad_id], targets)


def _shared_block(prompt_ids: Sequence[int], responses: Sequence[Response], first_seq: int,
                  pad_id: int) -> _Block:
    prompt = list(prompt_ids)
    prefix = prompt[:-1]
    block = _Block(list(prefix), list(range(len(prefix))), [0] * len(prefix),
                   prompt[1:], [-1] * len(prefix))
    for j, response in enumerate(responses):
        if response is None:  # absent: a sequence with no tokens
            continue
        branch = [prompt[-1], *response]
        block.ids += branch
        block.pos += range(len(prefix), len(prefix) + len(branch))
        block.branch += [j + 1] * len(branch)
        block.labels += list(response) + [pad_id]
        block.seq += [first_seq + j] * len(response) + [-1]
    return block


def _placeholder_block(pad_id: int) -> _Block:
    """One pad token scoring nothing: keeps a row for an absent pair (fixed row counts)."""
    return _Block([pad_id], [0], [-1], [pad_id], [-1])


def _pad_block(block: _Block, multiple: int, pad_id: int) -> _Block:
    """The block with padding tokens appended up to a multiple of ``multiple`` (THD under
    context parallelism): they continue its positions, score nothing, and as the block's
    tail never enter a real token's causal context."""
    extra = -len(block.ids) % multiple
    if not extra:
        return block
    last = block.pos[-1]
    return _Block(block.ids + [pad_id] * extra, block.pos + list(range(last + 1, last + 1 + extra)),
                  block.branch + [-1] * extra, block.labels + [pad_id] * extra, block.seq + [-1] * extra)


def _unit_blocks(unit: Unit, first_seq: int, share: bool, pad_id: int) -> list[_Block]:
    """A unit's blocks: one per response without sharing; with sharing one block per PAIR of
    responses (offline pair, online pair), so a MetaAPO row is [prompt | chosen | rejected]
    like a DPO row rather than one row with four branches (attention and masks grow with the
    square of the row length). An absent pair becomes a placeholder block."""
    if not share:
        return [_sequence_block(unit.prompt_ids, r, first_seq + j, pad_id)
                for j, r in enumerate(unit.responses) if r is not None]
    out = []
    for j in range(0, len(unit.responses), 2):
        pair = unit.responses[j:j + 2]
        if all(r is None for r in pair):
            out.append(_placeholder_block(pad_id))
        else:
            out.append(_shared_block(unit.prompt_ids, pair, first_seq + j, pad_id))
    return out


# ----------------------------------------------------------------- rows -> MicroBatch


def _row_mask(block_T: torch.Tensor, branch_T: torch.Tensor) -> torch.Tensor:
    """[T, T] True = masked: same block, causal, and no peeking into a sibling branch."""
    t = block_T.numel()
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same_block = block_T[:, None] == block_T[None, :]
    visible_branch = (branch_T[None, :] == 0) | (branch_T[None, :] == branch_T[:, None])
    return ~(causal & same_block & visible_branch)


def blocks_to_microbatch(rows: Sequence[Sequence[_Block]], units: Sequence[Unit],
                         pad_id: int, length: int | None = None, mask: bool = True) -> MicroBatch:
    """Right-pads rows of blocks into one `MicroBatch` with mask, positions and targets.

    Padding tokens form their own block (they attend only to padding, and nothing real
    attends to them), so no query is ever fully masked. ``mask=False`` (THD rows: the
    sequences are kept apart by ``extras["row_blocks"]``) builds no [N, 1, T, T] mask: at
    T = 16k it would be 256 MiB per micro-batch, moved to the GPU and never read.
    """
    longest = max(sum(len(b.ids) for b in row) for row in rows)
    t = longest if length is None else length
    if t < longest:
        raise ValueError(f"a row needs {longest} tokens > the fixed row length {t}")
    n = len(rows)
    ids = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, t), pad_id, dtype=torch.long)
    pos = torch.zeros((n, t), dtype=torch.long)
    seq = torch.full((n, t), -1, dtype=torch.long)
    block = torch.full((n, t), -1, dtype=torch.long)
    branch = torch.zeros((n, t), dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for k, b in enumerate(row):
            stop = start + len(b.ids)
            ids[i, start:stop] = torch.tensor(b.ids)
            labels[i, start:stop] = torch.tensor(b.labels)
            pos[i, start:stop] = torch.tensor(b.pos)
            seq[i, start:stop] = torch.tensor(b.seq)
            branch[i, start:stop] = torch.tensor(b.branch)
            block[i, start:stop] = k
            start = stop
    attention = torch.stack([_row_mask(block[i], branch[i]) for i in range(n)]).unsqueeze(1) if mask else None
    return MicroBatch(
        ids, labels, (seq >= 0).float(),
        extras=_extras(units, rows),
        attention_mask_N1TT=attention, position_ids_NT=pos, seq_index_NT=seq.clamp(min=0),
        num_seqs=_responses_per_unit(units) * len(units), select_logits=True, padding_NT=(block < 0) | (branch < 0),
    )


def _responses_per_unit(units: Sequence[Unit]) -> int:
    counts = {len(u.responses) for u in units}
    if len(counts) != 1:
        raise ValueError(f"units of one micro-batch have different response counts {sorted(counts)}")
    return counts.pop()


def _extras(units: Sequence[Unit], rows: Sequence[Sequence[_Block]] = ()) -> dict:
    return {
        "pair_index": torch.tensor([u.index for u in units]),
        "tokens": sum(data_tokens(u) for u in units),
        "row_blocks": [[len(b.ids) for b in row] for row in rows],  # THD metadata (GPU)
    }


def _padded_microbatch(units: Sequence[Unit], pad_id: int, length: int | None,
                       fixed_rows: bool = True) -> MicroBatch:
    """One ``[prompt | response]`` row per response, right-padded (`data.collate.pad_rows`).

    With `fixed_rows` an absent response is a placeholder row ``[prompt | pad]`` with loss
    mask 0, so row n is sequence n for every unit and every micro-batch has R rows per unit;
    without, absent responses take no row and ``seq_index_NT`` maps rows to sequences.
    """
    r = _responses_per_unit(units)
    present = [(j * r + k, u.prompt_ids, resp) for j, u in enumerate(units) for k, resp in enumerate(u.responses)
               if resp is not None]
    if fixed_rows or len(present) == r * len(units):
        rows = [(u.prompt_ids, (pad_id,) if x is None else x, x is not None) for u in units for x in u.responses]
        mb = MicroBatch(*pad_rows(rows, pad_id), extras=_extras(units))
    else:
        rows = [(p, x, True) for _, p, x in present]
        ids, labels, mask = pad_rows(rows, pad_id)
        seq = torch.tensor([q for q, _, _ in present]).unsqueeze(1).expand_as(ids).contiguous()
        mb = MicroBatch(ids, labels, mask, extras=_extras(units), seq_index_NT=seq, num_seqs=r * len(units))
    filled = torch.tensor([len(p) + len(x) for p, x, _ in rows])
    mb.padding_NT = torch.arange(mb.input_ids_NT.shape[1])[None, :] >= filled[:, None]
    return mb if length is None else mb.padded_to(length, pad_id)


# ----------------------------------------------------------------- layouts


def pack_first_fit(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: item indices per bin (ties keep input order).

    Raises:
        ValueError: If an item is larger than ``capacity``.
    """
    if sizes and max(sizes) > capacity:
        raise ValueError(f"a pair needs {max(sizes)} tokens > train.pack_tokens={capacity}; "
                         f"raise train.pack_tokens to >= {max(sizes)} (or leave it null)")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return bins


def build_microbatches(pairs: Sequence[Unit], layout: RowLayout, micro_pairs: int,
                       pad_id: int) -> list[MicroBatch]:
    """This rank's units of one step -> micro-batches in the given layout (CPU tensors).

    Args:
        pairs: The units of this rank for the step: DPO pairs, or MetaAPO round items (one
            response count per call).
        layout: The row layout.
        micro_pairs: Units per micro-batch for "pad" and "bucket" (`train.micro_batch_size`).
        pad_id: Padding token id.
    """
    if not pairs:
        return []
    mbs = _layout_microbatches(pairs, layout, micro_pairs, pad_id)
    m = layout.pad_multiple
    return [mb if mb.input_ids_NT.shape[1] % m == 0 else mb.padded_to(-(-mb.input_ids_NT.shape[1] // m) * m, pad_id)
            for mb in mbs]


def _layout_microbatches(pairs: Sequence[Unit], layout: RowLayout, micro_pairs: int,
                         pad_id: int) -> list[MicroBatch]:
    fixed = layout.fixed_length
    if layout.batching == "pack":
        sizes = [layout.unit_tokens(p) for p in pairs]
        capacity = layout.pack_tokens or max(sizes)
        groups = [[pairs[i] for i in sorted(b)] for b in pack_first_fit(sizes, capacity)]
        return [_rows_microbatch(g, layout, pad_id, one_row=True) for g in groups]
    order = list(pairs)
    if layout.batching == "bucket":
        order.sort(key=layout.unit_tokens)  # stable: equal lengths keep data order
    groups = [order[i:i + micro_pairs] for i in range(0, len(order), micro_pairs)]
    if not layout.share_prompt:
        keep = layout.fixed_rows or layout.batching == "pad"  # "pad": the reference path
        mbs = [_padded_microbatch(g, pad_id, fixed, keep) for g in groups]
        for mb in mbs:
            mb.select_logits = layout.batching != "pad"  # "pad" is the reference path, as is
        return mbs
    return [_rows_microbatch(g, layout, pad_id, one_row=False) for g in groups]


def _rows_microbatch(group: Sequence[Unit], layout: RowLayout, pad_id: int,
                     one_row: bool) -> MicroBatch:
    r = _responses_per_unit(group)
    blocks = [_unit_blocks(u, r * j, layout.share_prompt, pad_id) for j, u in enumerate(group)]
    if one_row:  # packed: every block of the group in one row (placeholders are not needed)
        rows = [[_pad_block(b, layout.seq_multiple, pad_id) for bs in blocks for b in bs
                 if any(q >= 0 for q in b.seq)]]
    else:  # one row per block: a unit of R responses takes R / 2 rows (absent pairs: see fixed_rows)
        rows = [[b] for bs in blocks for b in bs if layout.fixed_rows or any(q >= 0 for q in b.seq)]
    return blocks_to_microbatch(rows, group, pad_id, layout.fixed_length, mask=not (one_row and layout.thd))
