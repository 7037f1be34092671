"""A core-attention module for megatron's local (CPU) layer spec built on torch SDPA.

megatron-core's local `DotProductAttention` materialises the [b*np, s, s] score matrix
(baddbmm), masks and soft-maxes it in separate passes, then multiplies by V. On CPU that
is 3-5x slower (forward + backward, measured at s = 512..2048) than
`torch.nn.functional.scaled_dot_product_attention`, whose CPU kernel works block-wise with
an online softmax and the same boolean mask. Packed rows and shared-prompt rows make `s`
long, so the attention kernel decides whether those layouts pay off on CPU.

Numerics: the same maths (scale 1/sqrt(head_dim), masked keys excluded, fp32 softmax for
fp32 models); the block-wise summation order differs, so results agree to rounding
(tests/test_batching_layouts.py compares log-probs and gradients with the megatron core).
Masked entries: megatron adds -10000 before the softmax, SDPA -inf; both give exactly 0
weight whenever a query has at least one visible key, which every layout guarantees
(the diagonal is always visible).

Packed rows as THD `PackedSeqParams` (`train.pack_format=thd`): the same variable-length
causal attention per sequence that TE's fused attention computes from ``cu_seqlens``, so
the CPU runs the GPU's packing path (metadata, RoPE restarting per sequence, gathers).

Used through `use_sdpa_core(spec)` (`train.attention=sdpa`); the TE spec on GPU keeps TE's fused attention.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


class SDPAttention(torch.nn.Module):
    """Drop-in for megatron's `DotProductAttention` (same constructor and forward call).

    Shapes: query [sq, b, np, hn]; key/value [sk, b, ng, hn] (GQA: ng divides np);
    attention_mask [b or 1, 1, sq, sk]: boolean with True = masked (megatron's convention),
    or an additive float mask (0 / -inf, what `MegatronLM` passes: built once per
    micro-batch, not per layer), or None for plain causal attention. Returns [sq, b, np * hn].
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__()
        tp = pg_collection.tp.size() if pg_collection is not None else _tp_size()
        self.cp = config.context_parallel_size
        self._cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        if config.apply_query_key_layer_scaling:
            raise ValueError("SDPAttention does not implement apply_query_key_layer_scaling")
        p = config.attention_dropout if attention_dropout is None else attention_dropout
        if p:
            raise ValueError(f"SDPAttention is for dropout-free training; attention_dropout={p}")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention_bias")
        if packed_seq_params is not None:
            return self._thd(query, key, value, packed_seq_params)
        if self.cp > 1:
            raise ValueError(
                f"context_parallel_size={self.cp}: SDPAttention splits sequences across CP ranks only "
                "for THD-packed rows (packed_seq_params); padded rows would attend to this rank's share "
                "of the tokens alone")
        sq, b, np_, hn = query.shape
        # [s, b, n, h] -> [b, n, s, h]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        k, v = self._groups_to_heads(k, v, dim=1)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            if attention_mask.dtype == torch.bool:  # megatron's convention: True = masked
                attention_mask = torch.zeros_like(attention_mask, dtype=q.dtype).masked_fill_(
                    attention_mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask,
                                                 scale=self.softmax_scale)
        # [b, n, s, h] -> [s, b, n * h]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _groups_to_heads(self, k, v, dim: int):
        """GQA: each key/value group repeated for its query heads (along ``dim``)."""
        if self.groups == self.heads:
            return k, v
        rep = self.heads // self.groups
        return k.repeat_interleave(rep, dim=dim), v.repeat_interleave(rep, dim=dim)

    def _thd(self, query, key, value, params):
        """Variable-length causal attention over a THD stream, as TE's fused attention runs it.

        query [t, np, hn], key/value [t, ng, hn] (megatron squeezes the dummy batch dim for
        ``qkv_format="thd"``); sequence i's tokens are the slot ``cu_seqlens_q_padded[i] :
        cu_seqlens_q_padded[i + 1]``, of which the first ``cu_seqlens_q[i + 1] -
        cu_seqlens_q[i]`` are real. Each sequence attends causally to itself only; a slot's
        padding tail gets zeros (nothing reads it: its tokens are never scored, and causal
        attention keeps them out of every real token's keys). Returns [t, np * hn].
        """
        if params.qkv_format != "thd":
            raise ValueError(f"SDPAttention takes packed_seq_params with qkv_format='thd', not "
                             f"{params.qkv_format!r}")
        real = params.cu_seqlens_q.tolist()
        slots = (params.cu_seqlens_q_padded if params.cu_seqlens_q_padded is not None
                 else params.cu_seqlens_q).tolist()
        if self.cp > 1:
            return self._thd_cp(query, key, value, slots)
        t, np_, hn = query.shape
        if slots[-1] != t:
            raise ValueError(f"THD stream of {t} tokens, but cu_seqlens end at {slots[-1]}")
        # [t, n, h] -> [n, t, h]
        q, k, v = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        k, v = self._groups_to_heads(k, v, dim=0)
        pieces = []
        for i in range(len(slots) - 1):
            start, n, slot = slots[i], real[i + 1] - real[i], slots[i + 1] - slots[i]
            sl = slice(start, start + n)
            pieces.append(F.scaled_dot_product_attention(q[:, sl], k[:, sl], v[:, sl], is_causal=True,
                                                         scale=self.softmax_scale))
            if slot > n:
                pieces.append(q.new_zeros(np_, slot - n, hn))
        out = torch.cat(pieces, dim=1)  # [n, t, h]
        return out.transpose(0, 1).reshape(t, np_ * hn)


    def _thd_cp(self, query, key, value, slots: list[int]):
        """`_thd` on this context-parallel rank's share of the stream (`MicroBatch.cp_shard`).

        The CPU stand-in for Transformer Engine's context-parallel attention (its ring of
        K/V exchanges): every rank all-gathers K and V (`_GatherCP`: the backward sums the
        ranks' K/V gradients), puts them back in stream order, and runs its local queries
        causally against their whole sequence slot. A slot's padding is its tail, so causal
        attention keeps it out of every real token's context, as in `_thd`.
        """
        group = self._cp_group if self._cp_group is not None else _cp_group()
        cp, rank = self.cp, torch.distributed.get_rank(group)
        lengths = tuple(b - a for a, b in zip(slots[:-1], slots[1:]))
        t, np_, hn = query.shape
        if slots[-1] != t * cp:
            raise ValueError(f"CP share of {t} tokens x cp {cp}, but cu_seqlens end at {slots[-1]}")
        order, visible = _cp_layout(lengths, cp, rank)  # the same for every layer of the row
        kv = _GatherCP.apply(torch.stack([key, value]), group, cp)  # [2, t * cp, ng, hn], rank-major
        kv = torch.empty_like(kv).index_copy_(1, order.to(kv.device), kv)  # stream order
        k, v = self._groups_to_heads(kv[0].transpose(0, 1), kv[1].transpose(0, 1), dim=0)  # [np, T, hn]
        q = query.transpose(0, 1)
        pieces, local = [], 0
        for i, mask in enumerate(visible):
            n = mask.shape[0]
            sl = slice(slots[i], slots[i + 1])
            pieces.append(F.scaled_dot_product_attention(q[:, local:local + n], k[:, sl], v[:, sl],
                                                         attn_mask=mask.to(q.device), scale=self.softmax_scale))
            local += n
        out = torch.cat(pieces, dim=1)  # [n, t, h]
        return out.transpose(0, 1).reshape(t, np_ * hn)


class _GatherCP(torch.autograd.Function):
    """All-gather along dim 1 over the CP group; backward: the summed gradient's own slice.

    Backend-neutral (gloo has no reduce-scatter): the gradient of the gathered tensor is
    all-reduced, and each rank keeps the part that came from its input.
    """

    @staticmethod
    def forward(ctx, x, group, cp):
        ctx.group, ctx.cp = group, cp
        parts = [torch.empty_like(x) for _ in range(cp)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        rank = torch.distributed.get_rank(ctx.group)
        return grad.chunk(ctx.cp, dim=1)[rank].contiguous(), None, None


@functools.lru_cache(maxsize=16)
def _cp_layout(lengths: tuple[int, ...], cp: int, rank: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """For a row's slot lengths: where the ranks' gathered shares go in stream order, and per
    sequence the causal mask of this rank's queries over the whole slot (True = visible)."""
    from metaapo_nemo.models.packed_seq import cp_partition_index

    order = torch.cat([cp_partition_index(lengths, cp, r) for r in range(cp)])
    visible = []
    for length in lengths:
        pos_q = cp_partition_index([length], cp, rank)  # this rank's positions in the slot
        visible.append(pos_q[:, None] >= torch.arange(length)[None, :])
    return order, visible


def _cp_group():
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_group()


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def use_sdpa_core(spec) -> None:
    """Makes a local GPT layer spec (megatron's ModuleSpec) use `SDPAttention` as its core."""
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
