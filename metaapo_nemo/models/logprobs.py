"""Per-token log-probs of target tokens on TP-sharded logits (never gathers the vocabulary).

Legend: N rows, T positions, V/tp local vocabulary slice.

log p(y_t) = -CE(logits_t, y_t) computed by megatron's vocab-parallel cross entropy:
each TP rank holds logits for its vocabulary slice; the max and the softmax denominator
are all-reduced across the TP group and the target logit is picked by the rank that owns
it. Rows of the vocabulary that exist only because of TP padding are masked to -inf first,
so they never receive probability mass.
"""

from __future__ import annotations

import torch

from metaapo_nemo.parallel.state import ParallelContext


def mask_padded_vocab(logits_NTv: torch.Tensor, vocab_size: int, ctx: ParallelContext) -> torch.Tensor:
    """Sets logits of padded vocabulary entries (id >= vocab_size) to -inf on this rank's slice."""
    local = logits_NTv.shape[-1]
    start = ctx.tp_rank * local
    n_real = max(0, min(local, vocab_size - start))
    if n_real == local:
        return logits_NTv
    keep = torch.arange(local, device=logits_NTv.device) < n_real
    return logits_NTv.masked_fill(~keep, float("-inf"))


def token_logprobs(
    logits_NTv: torch.Tensor, labels_NT: torch.Tensor, vocab_size: int, ctx: ParallelContext
) -> torch.Tensor:
    """Log-probability of each label under the model, computed on the local vocab slice.

    Args:
        logits_NTv: this rank's logits slice, [N, T, V/tp] (fp32 recommended).
        labels_NT: target token ids [N, T] (ids of padding positions are ignored by callers
            through the loss mask but must be valid ids < vocab_size).
        vocab_size: the real (unpadded) vocabulary size.
        ctx: the parallel context (TP rank of this slice).

    Returns:
        [N, T] log-probs, differentiable w.r.t. the logits.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = mask_padded_vocab(logits_NTv.float(), vocab_size, ctx)
    # megatron's kernel expects [T, N, V/tp]; it does not modify its input in place.
    nll_TN = vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(), labels_NT.t().contiguous())
    return -nll_TN.t()


def sequence_logprobs(logps_NT: torch.Tensor, loss_mask_NT: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probs over response tokens (prompt and padding masked) -> [N]."""
    return (logps_NT * loss_mask_NT).sum(dim=-1)
