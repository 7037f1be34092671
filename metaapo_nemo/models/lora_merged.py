"""LoRA's merged compute (``lora.compute=merged``): each adapted linear runs as ONE GEMM with its
weight merged, ``W' = W + s B A``, in both the forward (``y = x W'^T``) and the input gradient
(``dx = dy W'``); the adapters' gradients come from their low-rank factors in the backward:

    h = x A^T,   g = dy B,   dB = s dy^T h,   dA = s g^T x        (s = alpha / r)

The adapter path of `models.lora.LoraAdapter.add_delta` (``lora.compute=adapters``) adds
``s B (A x)`` beside the frozen GEMM: two more skinny GEMMs in the forward and two more (``dh A``
and its sum into dx) in the backward. Merged saves those at the price of one copy of the
adapted weights (W', in the weights' dtype), built once per schedule (`merged_weights`: every
micro-batch of a step, or of a forward-only pass, shares it; the adapters cannot change inside
one) and dropped after it (on the CPU its buffer is kept and merged into again: `_buffer`). The
backward reads each projection's own rows of dy, so no GEMM touches the zero blocks of a fused
linear's B (q / k / v, gate / up: 3x and 2x the B side's flops otherwise). Exactly PEFT's
function without dropout (``B A x`` of the dropped-out input has no merged form):
``lora.dropout > 0`` is refused with merged, and so is Transformer Engine's spec, whose fused
linears take no substitute weight.

It plugs into megatron's local linears at their ``_forward_impl(input, weight, ...)`` seam (both
0.16 and 0.19): the column- / row-parallel wrapper around it (the input copy or sequence-parallel
gather, the output reduce) is megatron's own. Under tensor parallelism, this rank's W' is its
shard of the merged weight (A replicated and B split by rows for a column-parallel linear, A
split by columns and B replicated for a row-parallel one), and the factor gradients need
[tokens, k r]-sized collectives only, matching what the adapter path's autograd does:

- column-parallel: g is partial over the TP ranks' output rows: all-reduced without sequence
  parallelism; with it, A is marked ``sequence_parallel`` and megatron's ``finalize_model_grads``
  all-reduces dA.
- row-parallel: h is partial over the TP ranks' input columns: all-reduced. dy arrives whole on
  every rank; with sequence parallelism B is marked ``sequence_parallel`` (its gradient summed by
  ``finalize_model_grads``), so each rank takes dB over its own sequence shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch


class Adapter(Protocol):
    """What the merged compute reads of a `models.lora.LoraAdapter`."""

    kind: str
    parts: tuple[str, ...]
    scale: float
    enabled: bool
    tp: int
    tp_rank: int
    sp: bool

    def _a_cat(self) -> torch.Tensor: ...

    def _b(self, part: str) -> torch.Tensor: ...

    def _b_fused(self) -> torch.Tensor: ...

    def part_rows(self) -> list[slice | torch.Tensor]: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


class _Merged:
    """One linear's merged tensors for one schedule (detached: the factors' gradients are the
    backward's own): ``w`` = W + s B A; ``a`` = the stacked A; ``bs`` = each projection's B.

    ``into``: a buffer of W's shape and dtype to merge into (the schedule scope's, reused so that
    the CPU does not page a fresh copy of the weights in at every step), else a new tensor."""

    def __init__(self, adapter: Adapter, weight: torch.Tensor, into: torch.Tensor | None = None):
        with torch.no_grad():
            self.a = adapter._a_cat().detach()
            self.bs = [adapter._b(p).detach() for p in adapter.parts]
            b = adapter._b_fused().detach()
            if weight.dtype == torch.float32:
                self.w = torch.addmm(weight, b, self.a, alpha=adapter.scale, out=into)
            else:  # merge in fp32, round once
                w = torch.addmm(weight.float(), b.float(), self.a.float(), alpha=adapter.scale)
                self.w = w.to(weight.dtype) if into is None else into.copy_(w)


def _buffer(adapter: Adapter, weight: torch.Tensor) -> torch.Tensor | None:
    """The adapter's persistent merge buffer, on the CPU only: a fresh 100s-of-MB tensor there is
    page-faulted in on every step (measured: ~10^5 minor faults a step for SmolLM2-135M), where
    CUDA's caching allocator hands back the block it freed at the last schedule's end (so a GPU run
    holds W' only within a schedule, as planned: planner.gpu ``lora_merged_weights``)."""
    if weight.device.type != "cpu":
        return None
    buf = getattr(adapter, "_merged_buf", None)
    if buf is None or buf.shape != weight.shape or buf.dtype != weight.dtype:
        buf = adapter._merged_buf = torch.empty_like(weight)  # type: ignore[attr-defined]
    return buf


def install(module: torch.nn.Module, adapter: Adapter) -> None:
    """Routes ``module``'s matrix multiply through the merged compute while ``adapter`` is on
    (the adapters-off base, the reference, takes megatron's frozen path unchanged)."""
    original = module._forward_impl
    adapter._merged_cache = None  # type: ignore[attr-defined]
    adapter._merged_caching = False  # type: ignore[attr-defined]
    row = adapter.kind == "row"

    def _forward_impl(input, weight, *args, **kwargs):
        if not adapter.enabled:
            return original(input, weight, *args, **kwargs)
        if args or kwargs.get("gtp_remat_size", 1) != 1 or kwargs.get("grad_output_buffer") is not None:
            raise RuntimeError("lora.compute=merged: megatron called its linear with arguments this build "
                               "does not handle (positional, gtp remat or a grad-output buffer); use "
                               "lora.compute=adapters")
        x = input
        if kwargs.get("sequence_parallel"):  # as megatron's frozen path: gather the sequence shards
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True,
                                                     group=module.tp_group)
        merged = adapter._merged_cache  # type: ignore[attr-defined]
        if merged is None:
            if adapter._merged_caching:  # type: ignore[attr-defined]
                # inside a schedule: every graph that read the buffer before has run its backward
                merged = _Merged(adapter, weight, _buffer(adapter, weight))
                adapter._merged_cache = merged  # type: ignore[attr-defined]
            else:  # a lone call: its own tensor (a graph still alive may hold an older merge)
                merged = _Merged(adapter, weight)
        meta = (adapter, row, bool(kwargs.get("allreduce_dgrad")), module.tp_group)
        return _MergedLinear.apply(x, kwargs.get("bias"), merged, meta, *adapter.parameters())

    module._forward_impl = _forward_impl  # type: ignore[method-assign]


@contextlib.contextmanager
def merged_weights(adapters: Sequence[Adapter]) -> Iterator[None]:
    """One schedule's scope: each adapted linear merges its weight once (at its first micro-batch)
    and every later micro-batch reuses it; dropped at the end (the CPU keeps the buffer it was
    merged into for the next schedule: `_buffer`). Outside this scope every call merges afresh
    into a tensor of its own, so nothing can go stale."""
    for a in adapters:
        a._merged_cache, a._merged_caching = None, True  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for a in adapters:
            a._merged_cache, a._merged_caching = None, False  # type: ignore[attr-defined]


class _MergedLinear(torch.autograd.Function):
    """``y = x W'^T (+ bias)``; backward: dx through W', dA / dB through the factors (module
    docstring). The adapter's parameters are inputs (A then B per projection, their registration
    order) so that autograd hands their gradients to megatron's hooks as for any parameter."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, merged: _Merged, meta: tuple, *params):
        ctx.save_for_backward(x)
        ctx.merged, ctx.meta = merged, meta
        out = torch.matmul(x, merged.w.t())
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        merged: _Merged = ctx.merged
        adapter, row, allreduce_dgrad, group = ctx.meta
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        tp, dx, work = adapter.tp, None, None
        if ctx.needs_input_grad[0]:  # not for the first layer's input (the frozen embedding's)
            dx = (dy2 @ merged.w).view(*dy.shape[:-1], -1)
            if allreduce_dgrad and tp > 1:
                work = torch.distributed.all_reduce(dx, group=group, async_op=True)
        h = x2 @ merged.a.t()  # [N, k r]
        if row and tp > 1:  # partial over this rank's input columns
            torch.distributed.all_reduce(h, group=group)
        # each projection's own output rows of dy (no GEMM on the fused B's zero blocks)
        # (an index follows dy's device: the policy may have been offloaded and brought back)
        dys = [dy2[:, rows] if isinstance(rows, slice) else dy2.index_select(1, rows.to(dy2.device))
               for rows in adapter.part_rows()]
        gs = [d @ b for d, b in zip(dys, merged.bs)]
        g = gs[0] if len(gs) == 1 else torch.cat(gs, dim=1)  # [N, k r]
        if not row and tp > 1 and not adapter.sp:  # partial over this rank's output rows
            torch.distributed.all_reduce(g, group=group)
        s = adapter.scale
        d_a = torch.mm(g.t(), x2).mul_(s)  # [k r, in_local]
        if row and tp > 1 and adapter.sp:  # dB over this rank's sequence shard (summed by megatron)
            n = dy2.shape[0] // tp
            shard = slice(adapter.tp_rank * n, (adapter.tp_rank + 1) * n)
            dys, h = [dys[0][shard]], h[shard]
        if work is not None:
            work.wait()
        r = d_a.shape[0] // len(dys)
        grads: list[Any] = []  # A then B per projection, their registration order
        for i, d in enumerate(dys):
            grads += [d_a[i * r:(i + 1) * r], torch.mm(d.t(), h[:, i * r:(i + 1) * r]).mul_(s)]
        return (dx, None, None, None, *grads)
