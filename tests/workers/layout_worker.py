"""Multi-process worker for the layout tests: runs a list of jobs under one torchrun launch.

    torchrun --standalone --nproc-per-node N tests/workers/layout_worker.py SPEC.json

SPEC.json is ``{"jobs": [job, ...]}``; the jobs run one after the other in the same processes
(each initialises and tears down its own process groups, which saves the interpreter and
import start-up per layout). Kinds:

- ``train``: a method (``metaapo_nemo.run`` build/fit/finish, what the recipes run) with
  ``{"config": path, "overrides": [...], "method": "dpo" | "metaapo"}`` (default dpo).
  Results are the recipe's own files: ``<run.output_dir>/<run.name>/metrics.jsonl``,
  ``rounds.jsonl`` (MetaAPO) and ``hf_final/``; MetaAPO runs add ``meta_rank<r>.pt``, the
  meta-learner state of every rank.
- ``roundtrip``: HF -> Megatron (``tp``, ``pp``, ``vpp``) -> HF with ``{"hf_dir", "out"}``;
  writes ``out/`` (an HF checkpoint) and ``out/../<name>.json`` (checks seen by every rank).
- ``pp_objects``: object broadcasts over the per-pipeline gloo groups the NCCL path builds
  (``{"pp", "out"}``); writes what every rank received.
- ``logprobs``: vocab-parallel token log-probs on synthetic TP-sharded logits vs the
  gathered computation; writes ``{"out": file}`` with the measured differences.

Everything a test asserts on is written to files; the exit status is non-zero on any error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def run_train(job: dict) -> None:
    from metaapo_nemo import run as R
    from metaapo_nemo.config.loader import load_config

    cfg = load_config(job.get("config"), job["overrides"], method=job.get("method", "dpo"))
    components = R.build(cfg, job.get("method", "dpo"))
    st = R.fit(components)
    learner = getattr(components.algorithm, "learner", None)
    if learner is not None:  # MetaAPO: every rank's h_phi, to check they are identical
        torch.save(learner.state_dict(), components.run_dir / f"meta_rank{components.ctx.rank}.pt")
    R.finish(components, st)  # exports hf_final and destroys the process groups


def _gather_checks(local: dict, ctx) -> list[dict]:
    out: list[dict] = [{} for _ in range(ctx.dims.world_size)]
    dist.all_gather_object(out, local)
    return out


def run_roundtrip(job: dict) -> None:
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import export_hf, load_hf_weights
    from metaapo_nemo.models.megatron_model import BuildOptions, build_gpt_chunks, padded_vocab_size
    from metaapo_nemo.parallel import state

    ctx = state.initialize(tp=job["tp"], pp=job["pp"], vpp=job.get("vpp"))
    try:
        arch = load_arch(job["hf_dir"])
        chunks = build_gpt_chunks(arch, ctx, BuildOptions())
        load_hf_weights(chunks, job["hf_dir"], arch, ctx)
        # Rows that exist only because of TP padding must be zero (they never get mass).
        padded = padded_vocab_size(arch.vocab_size, ctx.dims.tp)
        local = padded // ctx.dims.tp
        n_real = max(0, min(local, arch.vocab_size - ctx.tp_rank * local))
        pad_rows_zero = True
        layers = []
        for chunk in chunks:
            params = dict(chunk.named_parameters())
            for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                if name in params:
                    assert params[name].shape[0] == local, (name, params[name].shape, local)
                    pad_rows_zero &= bool((params[name][n_real:] == 0).all())
            layers.append([layer.layer_number - 1 for layer in chunk.decoder.layers])
        export_hf(chunks, arch, ctx, job["hf_dir"], job["out"])
        checks = _gather_checks(
            {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank,
             "pad_rows_zero": pad_rows_zero, "local_vocab": local, "layers": layers}, ctx)
        if ctx.is_main:
            Path(job["out"] + ".json").write_text(json.dumps(checks, indent=1))
    finally:
        state.destroy()


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of float32 numbers at ``x`` (elementwise)."""
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.abs()).exponent - 24)


def run_logprobs(job: dict) -> None:
    """token_logprobs on this rank's vocab slice == log_softmax of the full logits, gathered."""
    from metaapo_nemo.models.logprobs import token_logprobs
    from metaapo_nemo.models.megatron_model import padded_vocab_size
    from metaapo_nemo.parallel import state

    ctx = state.initialize(tp=job["tp"])
    try:
        vocab = job["vocab_size"]
        padded = padded_vocab_size(vocab, ctx.dims.tp)
        local = padded // ctx.dims.tp
        lo, hi = ctx.tp_rank * local, (ctx.tp_rank + 1) * local  # this rank's vocab slice
        n_real = max(0, min(local, vocab - lo))
        gen = torch.Generator().manual_seed(0)  # same tensors on every rank
        full = torch.randn(3, 11, padded, generator=gen, dtype=torch.float32)
        full[..., vocab:] = 50.0  # padding rows with a huge logit: must still get no mass
        labels = torch.randint(0, vocab, (3, 11), generator=gen)
        mine = full[..., lo:hi].clone().requires_grad_(True)
        got = token_logprobs(mine, labels, vocab, ctx)
        ref_logits = full[..., :vocab].clone().requires_grad_(True)
        want = torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None])[..., 0]
        got.sum().backward()
        want.sum().backward()
        ref_grad = torch.cat([ref_logits.grad, torch.zeros(3, 11, padded - vocab)], -1)[..., lo:hi]
        # Mass over the real vocabulary: log sum_v p(v) = 0 when padding gets nothing.
        every = torch.arange(vocab)[None]  # [1, V] labels: every real id once
        row = full[:1, :1].expand(1, vocab, padded)[..., lo:hi].contiguous()
        mass = torch.logsumexp(token_logprobs(row, every, vocab, ctx)[0], 0)
        pad_grad = mine.grad[..., n_real:]
        local_res = {
            "max_diff": float((got - want).abs().max()),
            # in units of the fp32 spacing at each value (1 ulp = 2^(exponent - 23))
            "max_ulp": float(((got - want).abs() / ulp(want.detach())).max()),
            "max_grad_diff": float((mine.grad - ref_grad).abs().max()),
            "pad_grad_max": float(pad_grad.abs().max()) if pad_grad.numel() else 0.0,
            "log_mass": float(mass),
            "local_vocab": mine.shape[-1],
            "full_vocab": padded,
        }
        if job.get("hf_dir"):
            local_res |= _model_logprobs(job["hf_dir"], ctx)
        checks = _gather_checks(local_res, ctx)
        if ctx.is_main:
            Path(job["out"]).write_text(json.dumps(checks, indent=1))
    finally:
        state.destroy()


def _model_logprobs(hf_dir: str, ctx) -> dict:
    """A real checkpoint under TP: each rank's logits are its vocab slice only, and the
    vocab-parallel log-probs equal HF's log_softmax over the full vocabulary."""
    from transformers import AutoModelForCausalLM

    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.convert import load_hf_weights
    from metaapo_nemo.models.logprobs import token_logprobs
    from metaapo_nemo.models.megatron_model import BuildOptions, build_gpt_chunks, causal_mask

    arch = load_arch(hf_dir)
    chunk = build_gpt_chunks(arch, ctx, BuildOptions())[0]
    load_hf_weights([chunk], hf_dir, arch, ctx)
    ids = torch.randint(0, arch.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = chunk.eval()(ids, torch.arange(16).expand(2, 16), causal_mask(16, ids.device))
        got = token_logprobs(logits[:, :-1], ids[:, 1:], arch.vocab_size, ctx)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        full = hf(ids).logits[:, :-1]
        want = torch.log_softmax(full, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return {"model_vocab": arch.vocab_size, "model_local_logits": list(logits.shape),
            "model_max_diff": float((got - want).abs().max())}


def run_pp_objects(job: dict) -> None:
    """Object broadcasts across pipeline stages through the group the NCCL path builds
    (`state.pipeline_group_gloo(..., always_new=True)`: new gloo groups, one per pipeline),
    at DP2 x PP2: each pipeline's last stage sends its own payload; every rank must receive
    its pipeline's, and a following world collective must still line up."""
    from metaapo_nemo.parallel import state

    ctx = state.initialize(tp=job.get("tp", 1), pp=job["pp"])
    try:
        group = state.pipeline_group_gloo(ctx.pp_group, "nccl", always_new=True)
        ranks = dist.get_process_group_ranks(ctx.pp_group)
        assert dist.get_process_group_ranks(group) == ranks
        box = [{"from": ctx.rank, "pipeline": ranks} if ctx.is_last_stage else None]
        dist.broadcast_object_list(box, src=ranks[-1], group=group)
        after = torch.tensor([float(ctx.rank)])
        dist.all_reduce(after)  # the world's next collective is not crossed
        checks = _gather_checks({"rank": ctx.rank, "pipeline": ranks, "got": box[0],
                                 "world_sum": float(after)}, ctx)
        if ctx.is_main:
            Path(job["out"]).write_text(json.dumps(checks, indent=1))
    finally:
        state.destroy()


JOBS = {"train": run_train, "roundtrip": run_roundtrip, "logprobs": run_logprobs, "pp_objects": run_pp_objects}


def _keep_default_group() -> None:
    """Jobs tear down megatron's groups but keep torch's default group for the next job.

    Re-creating the default group inside one torchrun launch reuses the rendezvous store's
    keys and fails to connect; ``state.initialize`` reuses an initialised default group, so
    each job still builds its own megatron groups from scratch. Destroyed at exit.
    """
    from metaapo_nemo.parallel import state

    def destroy_model_parallel_only() -> None:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()

    state.destroy = destroy_model_parallel_only


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    _keep_default_group()
    for job in spec["jobs"]:
        JOBS[job["kind"]](job)
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
