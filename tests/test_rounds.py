"""MetaAPO training step on the Megatron policy: layout, ln 2, gradient mixing, margins."""

from __future__ import annotations

import math

import pytest
import torch

from metaapo_nemo import run as R
from metaapo_nemo.algorithms.rounds import (
    OnlinePair,
    RoundItem,
    collate_round,
    metaapo_loss_fn,
    offline_margins,
)
from metaapo_nemo.config.loader import load_config
from metaapo_nemo.trainer.preference import ReferenceCache, pair_logps, policy_loss_fn


@pytest.fixture
def comps(tmp_path):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'c'}",
                             "train.progress_bar=off", "train.global_batch_size=4", "train.micro_batch_size=2"],
                      method="dpo")
    c = R.build(cfg, "dpo")
    yield c
    c.logger.close()
    from metaapo_nemo.parallel import state

    state.destroy()


def _items(c, n=4, online=True):
    pairs = c.pairs[:n]
    out = []
    for i, p in enumerate(pairs):
        on = None
        if online and i != 1:  # prompt 1 has no online pair
            other = c.pairs[n + i]  # some other responses as "samples"
            on = OnlinePair(other.chosen_ids, other.rejected_ids, 1.0, 0.0)
        out.append(RoundItem(p, on))
    return out


def _attach_ref(c, mbs):
    for mb in mbs:
        outs = c.reference.run([mb], lambda m, lp: (torch.zeros(()), {"s": (lp * m.loss_mask_NT).sum(-1).detach()}),
                               forward_only=True)
        mb.extras["ref_logps_N"] = outs[0]["s"]


def test_collate_round_layout():
    from metaapo_nemo.data.preference import TokenizedPair

    p = TokenizedPair(0, (5, 6, 7), (8, 9, 3), (10, 3), False, False)
    q = TokenizedPair(1, (5, 6, 7), (8, 9, 3), (10, 3), False, False)
    mb = collate_round([RoundItem(p, OnlinePair((11, 3), (12, 13, 3), 2.0, 1.0)), RoundItem(q, None)],
                       pad_id=0, device=torch.device("cpu"))
    assert mb.input_ids_NT.shape[0] == 8
    assert mb.loss_mask_NT.sum(-1).tolist() == [3, 2, 2, 3, 3, 2, 0, 0]
    assert mb.extras["has_online"].tolist() == [True, False]
    assert mb.input_ids_NT[2, :5].tolist() == [5, 6, 7, 11, 3]


def test_first_step_loss_is_ln2_and_gradient_is_w_weighted_sum(comps):
    c = comps
    items = _items(c)
    w = 0.3
    mb = collate_round(items, c.tokenizer.pad_token_id, c.ctx.device)
    _attach_ref(c, [mb])
    weigher = lambda m: torch.full_like(m, w)  # noqa: E731

    def grads(loss_fn):
        c.policy.zero_grad()
        outs = c.policy.run([mb], loss_fn, forward_only=False)
        return outs, c.policy.main_grads()

    outs, g_mix = grads(metaapo_loss_fn(c.loss, weigher, num_prompts_global=4, unselected="offline"))
    assert outs[0]["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # pi == ref
    # the same step as two plain DPO losses over the offline rows and the online rows
    has = mb.extras["has_online"].float()

    def part(rows: tuple[int, int], scale):
        def fn(m, lp):
            seq = (lp * m.loss_mask_NT).sum(-1)
            ref = m.extras["ref_logps_N"]
            marg = (seq[rows[0]::4] - ref[rows[0]::4]) - (seq[rows[1]::4] - ref[rows[1]::4])
            per = -torch.nn.functional.logsigmoid(0.1 * marg) * scale
            return per.sum() / 4, {"loss": per.sum().detach() / 4}
        return fn

    _, g_off = grads(part((0, 1), torch.where(has.bool(), torch.full_like(has, w), torch.ones_like(has))))
    _, g_on = grads(part((2, 3), (1 - w) * has))
    for k in g_mix:
        # fp32 accumulation order differs between one and two backward passes: compare
        # the largest deviation against the tensor's scale
        scale = g_mix[k].abs().max().item()
        assert (g_mix[k] - g_off[k] - g_on[k]).abs().max().item() <= 1e-5 * scale + 1e-9, k


def test_offline_margins_match_the_dpo_step_margins(comps):
    c = comps
    from metaapo_nemo.trainer.batching import rank_microbatches

    batch = c.pairs[:4]
    mbs = rank_microbatches(batch, c.plan, 0, c.tokenizer.pad_token_id, c.ctx.device)
    margins = offline_margins(c.policy, c.reference, c.loss, mbs, c.ctx)
    assert sorted(margins) == sorted(p.index for p in batch)
    assert all(abs(v) < 1e-5 for v in margins.values())  # policy == reference before training
    # after one DPO step the margins equal what the loss sees
    ref = ReferenceCache()
    ref.fill(c.reference, mbs)
    ref.attach(mbs, True)
    c.policy.zero_grad()
    c.policy.run(mbs, policy_loss_fn(c.loss, 4), forward_only=False)
    c.policy.step()
    after = offline_margins(c.policy, c.reference, c.loss, mbs, c.ctx)
    stats = c.policy.run(mbs, lambda m, lp: (torch.zeros(()), {"m": c.loss.margin(pair_logps(m, lp)).detach()}),
                         forward_only=True)
    direct = {int(i): float(v) for mb, s in zip(mbs, stats) for i, v in zip(mb.extras["pair_index"], s["m"])}
    for k in direct:
        assert after[k] == pytest.approx(direct[k], abs=1e-4)
    assert any(abs(v) > 1e-3 for v in after.values())


ROUND_LAYOUTS = {  # name: (batching, share_prompt, fixed_rows)
    "bucket": ("bucket", False, True), "pad_share": ("pad", True, True), "bucket_share": ("bucket", True, True),
    "pack": ("pack", False, True), "pack_share": ("pack", True, True),
    # PP = 1: absent responses / pairs take no row (rows.RowLayout.fixed_rows)
    "bucket_lean": ("bucket", False, False), "bucket_share_lean": ("bucket", True, False),
}


@pytest.mark.parametrize("name", list(ROUND_LAYOUTS))
def test_round_rows_in_every_layout_equal_the_plain_layout(comps, name):
    """MetaAPO rows (offline + online pair of a prompt; one prompt without online pair) go
    through the same row layouts as DPO: per-sequence log-probs, loss and gradients equal
    the plain padded layout (fp32)."""
    from metaapo_nemo.algorithms.online import attach_reference_logps
    from metaapo_nemo.algorithms.rounds import round_microbatches, split_pairs_view
    from metaapo_nemo.trainer.rows import RowLayout

    c = comps
    items = _items(c, n=4)
    assert any(it.online is None for it in items)
    pad = c.tokenizer.pad_token_id
    batching, share, fixed_rows = ROUND_LAYOUTS[name]
    weigher = lambda m: torch.full_like(m, 0.3)  # noqa: E731

    def run(layout):
        mbs = round_microbatches(items, 2, pad, c.ctx.device, layout)
        attach_reference_logps(c.reference, mbs)
        seqs: dict[int, list[float]] = {}
        inner = metaapo_loss_fn(c.loss, weigher, num_prompts_global=4, unselected="offline")

        def fn(mb, logps):
            off, on = split_pairs_view(mb, logps)
            for j, i in enumerate(mb.extras["pair_index"].tolist()):
                seqs[i] = [off.policy_chosen_B[j].item(), off.policy_rejected_B[j].item(),
                           on.policy_chosen_B[j].item(), on.policy_rejected_B[j].item()]
            return inner(mb, logps)

        c.policy.zero_grad()
        outs = c.policy.run(mbs, fn, forward_only=False)
        return mbs, sum(o["loss"].item() for o in outs), seqs, c.policy.main_grads()

    plain_mbs, loss_a, seq_a, g_a = run(None)
    other_mbs, loss_b, seq_b, g_b = run(RowLayout(batching, share_prompt=share, fixed_rows=fixed_rows))
    assert sum(mb.extras["tokens"] for mb in plain_mbs) == sum(mb.extras["tokens"] for mb in other_mbs)
    rows = lambda mbs: sum(mb.input_ids_NT.shape[0] for mb in mbs)  # noqa: E731
    if not fixed_rows:  # prompt 1's absent online pair: no row (2 rows unshared, 1 shared)
        assert rows(other_mbs) == rows(run(RowLayout(batching, share_prompt=share))[0]) - (1 if share else 2)
    if share or batching == "pack":
        assert sum(mb.input_ids_NT.numel() for mb in other_mbs) < sum(mb.input_ids_NT.numel() for mb in plain_mbs)
    assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-7)
    assert seq_a.keys() == seq_b.keys()
    for i in seq_a:
        assert seq_b[i] == pytest.approx(seq_a[i], rel=1e-5, abs=1e-4), i
    for k in g_a:
        scale = g_a[k].abs().max().item()
        assert (g_a[k] - g_b[k]).abs().max().item() <= 1e-5 * scale + 1e-9, k


@pytest.mark.parametrize("name", ["plain", "bucket_lean", "bucket_share_lean", "pack_share"])
def test_online_only_rows_equal_the_zero_weighted_full_rows(comps, name):
    """weights=zero (Online DPO): leaving the offline rows of prompts with an online pair out
    of the step (`RoundItem.train_offline=False`) gives the loss and gradients of the full
    rows at w = 0, with fewer tokens; a prompt without an online pair (unselected=offline)
    keeps its offline rows."""
    import dataclasses

    from metaapo_nemo.algorithms.online import attach_reference_logps
    from metaapo_nemo.algorithms.rounds import (
        finalize_round_stats,
        round_microbatches,
        sum_round_stats,
    )
    from metaapo_nemo.trainer.rows import RowLayout

    c = comps
    items = _items(c, n=4)
    lean = [it if it.online is None else dataclasses.replace(it, train_offline=False) for it in items]
    layout = None if name == "plain" else RowLayout(name.split("_")[0], share_prompt="share" in name,
                                                    fixed_rows="lean" not in name)
    zero = lambda m: torch.zeros_like(m)  # noqa: E731

    def run(its):
        mbs = round_microbatches(its, 2, c.tokenizer.pad_token_id, c.ctx.device, layout)
        attach_reference_logps(c.reference, mbs)
        c.policy.zero_grad()
        outs = c.policy.run(mbs, metaapo_loss_fn(c.loss, zero, 4, "offline"), forward_only=False)
        stats = finalize_round_stats(sum_round_stats(outs), 4)
        return sum(mb.input_ids_NT.numel() for mb in mbs), stats, c.policy.main_grads()

    tokens_full, full, g_full = run(items)
    tokens_lean, lean_stats, g_lean = run(lean)
    if name != "plain":  # the reference layout keeps a placeholder row per absent response
        assert tokens_lean < tokens_full
    assert lean_stats["loss"] == pytest.approx(full["loss"], rel=1e-6, abs=1e-7)
    assert lean_stats["loss_online"] == pytest.approx(full["loss_online"], rel=1e-6)
    assert full["reward_accuracy"] == pytest.approx(0.0) and lean_stats["w_mean"] == 0.0
    # only prompt 1 (no online pair) has offline rows left: the offline figures are its own
    assert lean_stats["loss_offline"] == pytest.approx(math.log(2), abs=1e-6)
    for k in g_full:
        scale = g_full[k].abs().max().item()
        assert (g_full[k] - g_lean[k]).abs().max().item() <= 1e-5 * scale + 1e-9, k
    assert any(g.abs().max().item() > 0 for g in g_lean.values())
    with pytest.raises(AssertionError, match="offline rows left out wrongly"):  # a prompt with no pair at all
        run([dataclasses.replace(it, train_offline=False) for it in items])


def test_fp8_row_padding_leaves_logprobs_and_gradients_unchanged(comps):
    """The FP8 shape padding (RowLayout.pad_multiple) on MetaAPO rows in the run's layout:
    per-sequence log-probs, loss and gradients equal the unpadded micro-batches (fp32)."""
    import dataclasses

    from metaapo_nemo.algorithms.online import attach_reference_logps
    from metaapo_nemo.algorithms.rounds import round_microbatches

    c = comps
    items = _items(c, n=4)
    weigher = lambda m: torch.full_like(m, 0.3)  # noqa: E731

    def run(layout):
        mbs = round_microbatches(items, 2, c.tokenizer.pad_token_id, c.ctx.device, layout)
        attach_reference_logps(c.reference, mbs)
        seqs = []
        inner = metaapo_loss_fn(c.loss, weigher, num_prompts_global=4, unselected="offline")

        def fn(mb, logps):
            seqs.append(mb.sequence_logps(logps).detach())
            return inner(mb, logps)

        c.policy.zero_grad()
        outs = c.policy.run(mbs, fn, forward_only=False)
        return mbs, sum(o["loss"].item() for o in outs), seqs, c.policy.main_grads()

    mbs_a, loss_a, seq_a, g_a = run(c.layout)
    mbs_b, loss_b, seq_b, g_b = run(dataclasses.replace(c.layout, pad_multiple=16))
    assert all(mb.input_ids_NT.shape[1] % 16 == 0 for mb in mbs_b)
    assert any(a.input_ids_NT.shape != b.input_ids_NT.shape for a, b in zip(mbs_a, mbs_b))
    assert loss_b == pytest.approx(loss_a, rel=1e-6, abs=1e-7)
    for a, b in zip(seq_a, seq_b):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for k in g_a:
        scale = g_a[k].abs().max().item()
        assert (g_a[k] - g_b[k]).abs().max().item() <= 1e-5 * scale + 1e-9, k


def test_resumed_round_without_online_reference_values_gets_them(tmp_path):
    """A round checkpointed before the online pairs carried their reference log-probs (the
    reference ran per step then) resumes: `begin` computes them once, on every rank."""
    from metaapo_nemo.trainer.callbacks import TrainState

    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'c'}", "train.progress_bar=off",
                             "metaapo.sampling=none", "train.global_batch_size=4", "train.micro_batch_size=2"],
                      method="metaapo")
    c = R.build(cfg, "metaapo")
    try:
        c.algorithm.round.items = _items(c)
        assert any(it.online is not None for it in c.algorithm.round.items)
        c.algorithm.begin(TrainState(total_steps=1), resumed=True)
        for it in c.algorithm.round.items:
            assert it.online is None or (it.online.ref_chosen is not None and it.online.ref_rejected is not None)
    finally:
        c.logger.close()
        from metaapo_nemo.parallel import state

        state.destroy()
