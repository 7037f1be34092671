"""Greedy decoding and sampled-token log-probs with the Megatron policy (parity references).

Legend: N rows (prompts), T positions, V/tp this TP rank's vocabulary slice.

These are the references the rollout engine is checked against after a weight push, in
every training layout. No KV cache (tiny models, tests): every new token costs a full
forward of the rows so far, through megatron's forward-only schedule, so TP, PP and VPP
run the same code path as training.

- TP: logits are vocab-sharded; the argmax is the max over the TP group of each rank's
  local top-2 (values and global ids, padded vocabulary masked), ties to the lower id.
- PP: only the last stage sees logits; its next tokens (and top-2 gaps) are broadcast over
  the pipeline group so every stage feeds the same rows into the next forward.
- Rows of different lengths are right-padded: the causal mask keeps a row's last real
  position independent of the padding after it, and RoPE positions are 0..T-1 per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from metaapo_nemo.models.logprobs import mask_padded_vocab, token_logprobs
from metaapo_nemo.models.policy import MicroBatch
from metaapo_nemo.parallel import compat, cpu_compat

# consume(logits_NTv) -> tensors of fixed, known shapes (computed on the last stage)
Consumer = Callable[[torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class GreedyResult:
    """Greedy continuations and, per new token, the top-1 minus top-2 logit gap.

    A gap near 0 marks a near-tie: two engines with float rounding differences may pick
    different tokens there, and everything after it is not comparable.
    """

    tokens: list[list[int]]
    gaps: list[list[float]]


def _forward(
    lm, input_ids_NT: torch.Tensor, consume: Consumer, shapes: dict[str, tuple]
) -> dict[str, torch.Tensor]:
    """One forward-only pass of all rows; `consume` runs on the last stage's logits.

    Returns the consumer's tensors on EVERY rank (broadcast from the last stage).
    """
    ctx = lm.ctx
    n, t = input_ids_NT.shape
    ids = input_ids_NT.to(ctx.device)
    # sequence parallelism splits the tokens over the TP ranks: right-pad to a multiple of tp
    # (causal attention: the real positions' logits do not see the padding) and drop it after
    m = ctx.dims.tp if lm.config.sequence_parallel else 1
    if t % m:
        ids = torch.nn.functional.pad(ids, (0, m - t % m), value=lm.pad_id)
    out: dict[str, torch.Tensor] = {}

    def loss_func(output: torch.Tensor):
        out.update(consume(output[:, :t]))
        return torch.zeros((), device=ctx.device), torch.tensor(n, dtype=torch.int), {}

    # Plain causal rows; the policy's own input conventions (RoPE position layout for an
    # mrope-built model, boolean or SDPA mask) so that the reference runs exactly its model.
    plain = MicroBatch(ids, ids, torch.zeros(ids.shape, device=ctx.device))
    pos, mask = lm._positions(plain), lm._mask(plain)

    def forward_step(data_iterator, model):
        next(data_iterator)
        with cpu_compat.suspended():  # megatron's forward needs none of the CPU shims
            return model(ids, pos, mask), partial(loss_func)

    chunks = lm.chunks
    for chunk in chunks:
        chunk.eval()
    iterators = [iter([None]) for _ in chunks] if len(chunks) > 1 else iter([None])
    with torch.no_grad():
        compat.forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators,
            model=chunks,
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=n,
            forward_only=True,
        )
    if ctx.dims.pp > 1:
        last = dist.get_process_group_ranks(ctx.pp_group)[-1]
        for name, (shape, dtype) in shapes.items():
            buf = (
                out[name].contiguous()
                if ctx.is_last_stage
                else torch.empty(shape, dtype=dtype, device=ctx.device)
            )
            dist.broadcast(buf, src=last, group=ctx.pp_group)
            out[name] = buf
    return out


def _tp_top2(logits_Nv: torch.Tensor, vocab_size: int, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (argmax id [N], top1 - top2 gap [N]) from this rank's vocab slice."""
    local = logits_Nv.shape[-1]
    masked = mask_padded_vocab(logits_Nv.float(), vocab_size, ctx)
    vals, idx = masked.topk(2, dim=-1)  # [N, 2]
    idx = idx + ctx.tp_rank * local
    if ctx.dims.tp > 1:
        all_vals = [torch.empty_like(vals) for _ in range(ctx.dims.tp)]
        all_idx = [torch.empty_like(idx) for _ in range(ctx.dims.tp)]
        dist.all_gather(all_vals, vals.contiguous(), group=ctx.tp_group)
        dist.all_gather(all_idx, idx.contiguous(), group=ctx.tp_group)
        vals, idx = torch.cat(all_vals, -1), torch.cat(all_idx, -1)
    # Sort by value descending, then id ascending (torch.argmax's first-max rule).
    order = torch.argsort(idx, dim=-1, stable=True)
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    order = torch.argsort(vals, dim=-1, descending=True, stable=True)
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    return idx[:, 0], vals[:, 0] - vals[:, 1]


@torch.no_grad()
def greedy_decode(
    lm,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
) -> GreedyResult:
    """Greedy continuation of each prompt with a `MegatronLM` (call on every rank).

    Args:
        lm: The policy (`metaapo_nemo.models.policy.MegatronLM`), any layout.
        prompts: N prompts of token ids.
        max_new_tokens: Tokens to generate at most per prompt.
        stop_ids: A row stops after producing one of these (included, like vLLM's EOS).

    Returns:
        The new tokens and top-2 gaps of every row (identical on every rank).
    """
    ctx, vocab = lm.ctx, lm.arch.vocab_size
    rows = [list(p) for p in prompts]
    done = [False] * len(rows)
    new: list[list[int]] = [[] for _ in rows]
    gaps: list[list[float]] = [[] for _ in rows]
    n = len(rows)
    for _ in range(max_new_tokens):
        if all(done):
            break
        t = max(len(r) for r in rows)
        ids = torch.full((n, t), lm.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        last = torch.tensor([len(r) - 1 for r in rows], device=ctx.device)

        def consume(logits_NTv: torch.Tensor, last: torch.Tensor = last) -> dict[str, torch.Tensor]:
            at_last = logits_NTv[torch.arange(n, device=logits_NTv.device), last]
            token, gap = _tp_top2(at_last, vocab, ctx)
            return {"token": token.long(), "gap": gap.float()}

        out = _forward(
            lm, ids, consume, {"token": ((n,), torch.long), "gap": ((n,), torch.float32)}
        )
        for i in range(n):
            if done[i]:
                continue
            tok = int(out["token"][i])
            rows[i].append(tok)
            new[i].append(tok)
            gaps[i].append(float(out["gap"][i]))
            done[i] = tok in stop_ids
    return GreedyResult(new, gaps)


@torch.no_grad()
def sampled_logprobs(
    lm,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    temperature: float = 1.0,
) -> list[list[float]]:
    """log softmax(logits / T) of each response token given its prompt (call on every rank).

    The distribution vLLM samples from with ``logprobs_mode="processed_logprobs"`` and
    top_p = 1. Returns one list of floats per row, identical on every rank.
    """
    if temperature <= 0:
        raise ValueError(
            f"temperature={temperature} must be > 0 (greedy has no sampled distribution)"
        )
    ctx, vocab = lm.ctx, lm.arch.vocab_size
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    n, t = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, t), lm.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    labels = torch.roll(ids, -1, dims=1).to(ctx.device)

    def consume(logits_NTv: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "logps": token_logprobs(logits_NTv.float() / temperature, labels, vocab, ctx).float()
        }

    logps = _forward(lm, ids, consume, {"logps": ((n, t), torch.float32)})["logps"].cpu()
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        start = len(p) - 1  # position predicting the first response token
        out.append(logps[i, start : start + len(r)].tolist())
    return out
