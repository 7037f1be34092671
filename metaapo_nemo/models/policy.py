"""Megatron-Core language model engine: chunks + (DDP, optimiser, scheduler) + schedules.

`MegatronLM` is used for both the trained policy (`trainable=True`: megatron DDP wrapper,
megatron optimiser incl. the distributed optimiser, LR scheduler) and the frozen reference
(`trainable=False`: same layout, forward-only). Both run micro-batches through megatron's
forward/backward schedule (no pipelining, 1F1B, or interleaved 1F1B with VPP), so every
layout executes the same code path.

Loss normalisation: the model config sets `calculate_per_token_loss=True`, which makes
megatron neither divide the loss by the number of micro-batches nor average gradients over
data-parallel ranks (it sums them). Our loss callbacks already divide by the GLOBAL number
of pairs of the optimiser step, so the summed gradient is exactly the gradient of the
global mean, for any micro-batch x grad-accum x DP split. `finalize_model_grads` is called
without a token count so megatron does not rescale it again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch.profiler import record_function

from metaapo_nemo.models.arch import ModelArch
from metaapo_nemo.models.convert import load_hf_weights
from metaapo_nemo.models.logprobs import token_logprobs
from metaapo_nemo.models.megatron_model import BuildOptions, build_gpt_chunks, causal_mask
from metaapo_nemo.models.microbatch import MicroBatch, OutputSelector, Selection
from metaapo_nemo.parallel import compat, cpu_compat
from metaapo_nemo.parallel.state import ParallelContext


@dataclass(frozen=True)
class OptimSettings:
    """Optimiser + schedule settings (filled from the `optim` config section)."""

    lr: float
    min_lr: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    warmup_steps: int
    total_steps: int
    schedule: str  # cosine | linear | constant
    distributed_optimizer: bool = False


def _fuse_cpu_adam(optimizer) -> int:
    """Switches megatron's torch Adam(W) to torch's fused CPU kernel; returns how many.

    Without Apex/TE megatron falls back to `torch.optim.Adam(W)`, which on CPU runs the
    single-tensor loop (~10 passes over every parameter): 2.3 s per step on a 135M model
    against 0.34 s for the fused kernel (one pass; measured on 2 cores). Same update rule;
    tests/test_layout_equality.py checks the weights after a few steps against the loop.
    """
    count = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for group in inner.param_groups:
                group["foreach"], group["fused"] = False, True
            count += 1
    return count


# loss_fn(microbatch, logps_NT) -> (scalar loss already divided by the global count, stats)
LossFn = Callable[[MicroBatch, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class MegatronLM:
    """A Megatron-Core GPT model (all chunks of this rank) built from an HF checkpoint."""

    def __init__(
        self,
        arch: ModelArch,
        ctx: ParallelContext,
        hf_dir: str | Path,
        build: BuildOptions,
        optim: OptimSettings | None = None,
        pad_id: int = 0,
    ):
        self.arch, self.ctx, self.pad_id, self.build = arch, ctx, pad_id, build
        self.chunks = build_gpt_chunks(arch, ctx, build)
        load_hf_weights(self.chunks, hf_dir, arch, ctx)
        self.lora_parameters = 0
        if build.lora is not None:  # adapters on the base, which is frozen (models/lora.py)
            from metaapo_nemo.models.lora import attach_lora

            self.lora_parameters = attach_lora(self.chunks, arch, ctx, build.lora)
        self._selector = OutputSelector()
        for chunk in self.chunks:
            if chunk.post_process:
                chunk.output_layer.register_forward_pre_hook(self._selector, with_kwargs=True)
        self._causal: torch.Tensor | None = None
        on_gpu = ctx.device.type == "cuda"
        self._sdpa = build.attention == "sdpa" and build.spec_choice(on_gpu=on_gpu).impl == "local"
        self.config = self.chunks[0].config
        self.trainable = optim is not None
        self.router_loss: float | None = None  # MoE: the last training run's (`_mean_router_loss`)
        self.optimizer = None
        self.scheduler = None
        if self.trainable:
            self._wrap_for_training(optim)  # type: ignore[arg-type]
        else:
            for chunk in self.chunks:
                chunk.eval()
                chunk.requires_grad_(False)

    # ------------------------------------------------------------------ set-up
    def _wrap_for_training(self, optim: OptimSettings) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=optim.distributed_optimizer,
        )
        self.chunks = [
            DistributedDataParallel(self.config, ddp_cfg, chunk, disable_bucketing=(i > 0))
            for i, chunk in enumerate(self.chunks)
        ]
        # Gradients are already normalised by the global pair count: no token rescaling.
        self.config.finalize_model_grads_func = compat.finalize_grads_without_token_scaling()
        self.config.grad_scale_func = None
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=self.config.bf16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=optim.distributed_optimizer,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, self.chunks)
        if self.ctx.device.type == "cpu":
            _fuse_cpu_adam(self.optimizer)
        style = {"cosine": "cosine", "linear": "linear", "constant": "constant"}[optim.schedule]
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.warmup_steps > 0 else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            lr_decay_steps=max(optim.total_steps, optim.warmup_steps + 1),
            lr_decay_style=style,
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=max(optim.total_steps, 1),
            wd_incr_style="constant",
        )

    # ------------------------------------------------------------------ running
    def run(
        self,
        microbatches: Sequence[MicroBatch],
        loss_fn: LossFn,
        forward_only: bool,
    ) -> list[dict[str, torch.Tensor]]:
        """Runs all micro-batches through megatron's schedule; returns last-stage stats.

        Returns one stats dict per micro-batch on the last pipeline stage, [] elsewhere.
        """
        if not microbatches:
            return []
        real = len(microbatches)
        pp = self.ctx.dims.pp
        if forward_only and len(self.chunks) > 1 and real % pp:
            # The interleaved schedule takes only a multiple of PP micro-batches. A training
            # step's count is checked at start-up; a forward-only pass (reference values,
            # margins) of any size is padded with repeats whose outputs are dropped.
            microbatches = [*microbatches, *[microbatches[-1]] * (pp - real % pp)]
        cp = self.ctx.dims.cp
        # sequence parallelism splits each row's tokens over the TP ranks (the trainer's row
        # layouts already pad to it; forward-only passes of other rows are padded here: the
        # padding is masked out, so no real token's output changes)
        m = self.ctx.dims.tp if self.config.sequence_parallel and cp == 1 else 1
        seq_len = max(-(-mb.input_ids_NT.shape[1] // m) * m for mb in microbatches)
        if self.ctx.dims.pp > 1:  # p2p shapes are fixed for the whole step
            microbatches = [mb.padded_to(seq_len, self.pad_id) for mb in microbatches]
        elif m > 1:
            microbatches = [mb.padded_to(-(-mb.input_ids_NT.shape[1] // m) * m, self.pad_id) for mb in microbatches]
        if cp > 1:  # each CP rank runs its share of every THD row (after the PP padding); the
            # schedule's p2p shapes take the whole row's seq_len (megatron divides it by cp)
            microbatches = [mb.cp_shard(cp, self.ctx.cp_rank, self.ctx.cp_group) for mb in microbatches]
        rows = microbatches[0].input_ids_NT.shape[0]
        vocab = self.arch.vocab_size
        ctx = self.ctx
        role = "policy" if self.trainable else "reference"
        # Logit selection gathers hidden states along the full sequence: not with sequence
        # parallelism, where each TP rank holds a slice of it until the output layer.
        can_select = not self.config.sequence_parallel

        def loss_func(mb: MicroBatch, sel: Selection | None, output: torch.Tensor):
            with cpu_compat.suspended(), record_function(f"{role}.logprobs"):
                if sel is None:
                    logps_NT = token_logprobs(output, mb.labels_NT, vocab, ctx)
                else:  # output [1, K, V/tp]: scatter the K log-probs back to [N, T]
                    logps_K = token_logprobs(output, sel.labels_K[None], vocab, ctx)[0]
                    n, t = mb.labels_NT.shape
                    logps_NT = logps_K.new_zeros(n * t).index_add(0, sel.dense_idx_K, logps_K).view(n, t)
                loss, stats = loss_fn(mb, logps_NT)
            return loss, torch.tensor(rows, dtype=torch.int), stats

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            sel = Selection.of(mb) if mb.select_logits and can_select else None
            # The model forward needs none of the CPU shims' rewrites, and the shims'
            # TorchFunctionMode costs ~10x on a small model's forward (measured): lift it.
            with cpu_compat.suspended(), record_function(f"{role}.forward"):
                ids = mb.input_ids_NT.to(ctx.device)
                extra = {}
                if self.arch.num_experts:  # padding stays out of the router's load-balancing loss,
                    # which megatron scales by the (valid) tokens its router sees: divided out here
                    padding = (mb.padding_NT if mb.padding_NT is not None
                               else torch.zeros_like(mb.input_ids_NT, dtype=torch.bool)).to(ctx.device)
                    extra["padding_mask"] = padding
                    seen = max(1, int((~padding).sum()))  # over the TP group, also under SP
                    self.config.moe_aux_loss_coeff = router_weight / compat.router_loss_token_factor(
                        seen, ctx.dims.tp, ctx.dims.cp)
                self._selector.idx = None if sel is None else sel.hidden_idx_K
                try:
                    if mb.attention_mask_N1TT is None and mb.extras.get("row_blocks"):  # a THD row
                        out = model(ids, self._positions(mb, thd=True), None,
                                    packed_seq_params=self._thd_params(mb), **extra)
                    else:
                        out = model(ids, self._positions(mb), self._mask(mb), **extra)
                finally:
                    self._selector.idx = None
            return out, partial(loss_func, mb, sel)

        router_weight = self._router_loss_weight(real) if self.arch.num_experts and not forward_only else 0.0
        if self.arch.num_experts and not forward_only:
            compat.clear_moe_router_losses()
        vpp = len(self.chunks)
        iterators = [iter(microbatches) for _ in range(vpp)] if vpp > 1 else iter(microbatches)
        if forward_only:
            for chunk in self.chunks:
                chunk.eval()
        else:
            for chunk in self.chunks:
                chunk.train()
        fb = compat.forward_backward_func()
        merged = contextlib.nullcontext()
        if self.lora_parameters:  # lora.compute=merged: each linear merges W + s B A once per schedule
            from metaapo_nemo.models.lora import merged_weights

            merged = merged_weights(self.chunks)
        with torch.set_grad_enabled(not forward_only), record_function(f"{role}.schedule"), merged:
            out = fb(
                forward_step_func=forward_step,
                data_iterator=iterators,
                model=self.chunks,
                num_microbatches=len(microbatches),
                seq_length=seq_len,
                micro_batch_size=rows,
                forward_only=forward_only,
            )
        if self.arch.num_experts and not forward_only:
            self.router_loss = self._mean_router_loss(real)
        return list(out)[:real] if ctx.is_last_stage else []

    def _mean_router_loss(self, microbatches: int) -> float:
        """The step's MoE load-balancing loss, unweighted (1.0 = perfectly balanced routing),
        averaged over layers and over the micro-batches of every DP rank (a step metric)."""
        values = compat.moe_router_loss_values()
        if values is None:
            return float("nan")
        loss = values.detach().float().sum().reshape(1).to(self.ctx.device)
        count = torch.tensor([float(microbatches)], device=self.ctx.device)
        if self.config.sequence_parallel:  # each TP rank tracked its sequence shard's share
            torch.distributed.all_reduce(loss, group=self.ctx.tp_group)
        if self.ctx.dims.pp > 1:  # each stage tracked its own layers
            torch.distributed.all_reduce(loss, group=self.ctx.pp_group)
        if self.ctx.dims.dp > 1:
            torch.distributed.all_reduce(loss, group=self.ctx.dp_group)
            torch.distributed.all_reduce(count, group=self.ctx.dp_group)
        return float(loss / (count * self.arch.num_layers))

    def _router_loss_weight(self, microbatches: int) -> float:
        """The MoE load-balancing loss weight of each micro-batch of this step.

        Gradients are summed over micro-batches and data-parallel ranks (module docstring), so
        each micro-batch's router loss gets coef / (the step's micro-batches over all DP
        ranks): the step's router loss is their MEAN at the checkpoint's
        ``router_aux_loss_coef``, whatever the layout (packed steps' counts vary by rank: the
        count is all-reduced). megatron multiplies a micro-batch's router loss by the tokens
        its router saw (``calculate_per_token_loss``); the forward step divides that out
        (`compat.router_loss_token_factor`).
        """
        count = torch.tensor([float(microbatches)], device=self.ctx.device)
        if self.ctx.dims.dp > 1:
            torch.distributed.all_reduce(count, group=self.ctx.dp_group)
        return self.arch.router_aux_loss_coef / float(count.item())

    def _thd_params(self, mb: MicroBatch):
        """THD `PackedSeqParams` of a packed micro-batch (one row; `trainer.rows` records each
        sequence's token count in ``extras["row_blocks"]``)."""
        from metaapo_nemo.models.packed_seq import thd_packed_seq_params

        n, t = mb.input_ids_NT.shape
        t = mb.extras.get("thd_length", t)  # a context-parallel share: the whole row's metadata
        if not self.build.packed_thd:
            raise ValueError(
                "this micro-batch is packed for THD (no mask; RowLayout.thd) but the model was built "
                "without BuildOptions(packed_thd=True): its sequences would attend across each other")
        if n != 1:
            raise ValueError(f"a THD-packed micro-batch is one row, got {n}")
        return thd_packed_seq_params(mb.extras["row_blocks"], t, device=self.ctx.device)

    def _positions(self, mb: MicroBatch, thd: bool = False) -> torch.Tensor:
        """[N, T] positions, or [3, N, T] for the explicit-position (mrope) model. THD rows
        get 0..T-1: RoPE restarts at every sequence's cu_seqlens offset instead."""
        n, t = mb.input_ids_NT.shape
        if thd:
            return torch.arange(t, device=self.ctx.device).unsqueeze(0).expand(n, t)
        if mb.position_ids_NT is not None and not self.build.explicit_positions:
            raise ValueError(
                "this micro-batch has explicit positions (shared-prompt or packed rows) but the "
                "model was built without BuildOptions(explicit_positions=True): megatron's 'rope' "
                "path would silently use 0..T-1"
            )
        pos = mb.position_ids_NT
        if pos is None:
            pos = torch.arange(t, device=self.ctx.device).unsqueeze(0).expand(n, t)
        pos = pos.to(self.ctx.device)
        return pos.unsqueeze(0).expand(3, n, t) if self.build.explicit_positions else pos

    def _mask(self, mb: MicroBatch) -> torch.Tensor | None:
        """The attention mask in the form the core attention takes.

        megatron's attention: boolean, True = masked. SDPA (`models.attention`): None for
        plain causal rows (its causal kernel), else an additive float mask built once per
        micro-batch rather than once per layer inside SDPA.
        """
        sdpa = self._sdpa
        if mb.attention_mask_N1TT is not None:
            mask = mb.attention_mask_N1TT.to(self.ctx.device)
            if not sdpa:
                return mask
            dtype = self.config.params_dtype
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
        if sdpa:
            return None
        t = mb.input_ids_NT.shape[1]
        if self._causal is None or self._causal.shape[-1] < t:  # one mask, sliced per length
            self._causal = causal_mask(max(t, 256), self.ctx.device)
        return self._causal[..., :t, :t]

    def zero_grad(self) -> None:
        assert self.optimizer is not None
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float]:
        """Optimiser + scheduler step. Returns (update applied, global grad norm)."""
        assert self.optimizer is not None and self.scheduler is not None
        with record_function("optimizer"):
            ok, grad_norm = compat.optimizer_step(self.optimizer)
        if ok:
            self.scheduler.step(increment=1)
        return ok, float("nan") if grad_norm is None else grad_norm

    def grads_finite(self) -> bool:
        """True if every accumulated gradient on EVERY rank is finite (call after `run`).

        Checked before `step()` so a non-finite gradient can be skipped: megatron's
        fp32/bf16 optimisers would otherwise apply it (only fp16 has a found-inf check).
        """
        grads = [g for g in (getattr(p, "main_grad", None) for c in self.chunks for p in c.parameters())
                 if g is not None]
        ok = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.tensor(True)
        bad = (~ok).float().reshape(1).to(self.ctx.device)
        if torch.distributed.is_initialized() and self.ctx.dims.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bool(bad.item() == 0)

    def main_grads(self) -> dict[str, torch.Tensor]:
        """Accumulated (DP-reduced) gradients by parameter name, after `run` (tests, debugging)."""
        grads = {}
        for c, chunk in enumerate(self.chunks):
            for name, param in chunk.named_parameters():
                grad = getattr(param, "main_grad", None)
                grad = param.grad if grad is None else grad
                if grad is not None:
                    grads[f"{c}.{name}"] = grad.detach().clone()
        return grads

    @property
    def lr(self) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[0]["lr"])

    def modules(self) -> list[torch.nn.Module]:
        """The bare GPTModel chunks (DDP unwrapped), e.g. for export."""
        return [c.module if hasattr(c, "module") else c for c in self.chunks]

    def offload(self, device: str | torch.device) -> None:
        """Moves frozen weights between devices (reference model CPU offload)."""
        assert not self.trainable, "only the frozen reference is offloaded"
        for chunk in self.chunks:
            chunk.to(device)
