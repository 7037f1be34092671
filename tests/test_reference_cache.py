"""The reference cache lives with the data: cached equals fresh, filled once per reference
version (per step, per pass, or by MetaAPO's round-start margin pass), invalidated on change."""

from __future__ import annotations

import pytest
import torch

from metaapo_nemo import run as R
from metaapo_nemo.config.loader import load_config
from tasks.synthetic import chat_lengths, synthetic_pairs

PAIRS = synthetic_pairs(8, 250, chat_lengths((3, 30), (2, 30)), seed=5, eos_id=2)



@pytest.fixture
def comps(tmp_path):
    from metaapo_nemo.parallel import state

    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}",
                             "train.progress_bar=off", "train.save_final_hf=false", "train.epochs=2",
                             "train.global_batch_size=4", "train.micro_batch_size=2",
                             "train.max_steps=null", "optim.warmup_ratio=0"], method="dpo")
    c = R.build(cfg, "dpo", pairs=PAIRS)
    calls = []
    run = c.reference.run
    c.reference.run = lambda mbs, *a, **k: (calls.append(len(mbs)), run(mbs, *a, **k))[1]
    try:
        yield c, calls
    finally:
        c.logger.close()
        state.destroy()


def _fresh(c, pairs) -> dict[int, tuple[float, float]]:
    """Reference values by a plain-layout forward, outside the cache."""
    from metaapo_nemo.trainer.batching import to_microbatches
    from metaapo_nemo.trainer.preference import reference_loss_fn

    mbs = to_microbatches(pairs, 2, c.tokenizer.pad_token_id, c.ctx.device)
    out = {}
    for mb, o in zip(mbs, c.reference.run(mbs, reference_loss_fn, forward_only=True)):
        for j, i in enumerate(mb.extras["pair_index"].tolist()):
            out[i] = tuple(o["seq_logps_N"][2 * j:2 * j + 2].tolist())
    return out


def test_cached_equals_fresh_and_is_filled_once_per_version(comps):
    c, calls = comps
    c.algorithm.fill_reference(PAIRS)
    assert len(c.ref_cache) == len(PAIRS) and calls
    filled = len(calls)
    c.algorithm.fill_reference(PAIRS[:3])  # all cached: the reference does not run
    assert len(calls) == filled
    fresh = _fresh(c, PAIRS)
    for p in PAIRS:
        cached = c.ref_cache._value(p.index)
        torch.testing.assert_close(torch.tensor(cached), torch.tensor(fresh[p.index]), rtol=1e-6, atol=1e-6)
    c.ref_cache.invalidate()  # e.g. MetaAPO's per-round reference update
    assert len(c.ref_cache) == 0 and c.ref_cache.version == 1
    assert c.ref_cache.missing(PAIRS) == PAIRS


def test_two_epochs_run_the_reference_only_in_the_first(comps):
    c, calls = comps
    attached = []
    policy_run = c.policy.run

    def spy(mbs, loss_fn, forward_only):
        attached.extend((int(i), tuple(mb.extras["ref_logps_N"][2 * j:2 * j + 2].tolist()))
                        for mb in mbs for j, i in enumerate(mb.extras["pair_index"].tolist()))
        return policy_run(mbs, loss_fn, forward_only)

    c.policy.run = spy
    st = R.fit(c)
    assert st.step == 2 * len(PAIRS) // 4
    assert sum(calls) > 0 and len(c.ref_cache) == len(PAIRS)
    first_epoch_calls = len(calls)
    assert first_epoch_calls == len(PAIRS) // 4  # one reference run per step of epoch 1 only
    by_pair: dict[int, list] = {}
    for i, v in attached:
        by_pair.setdefault(i, []).append(v)
    assert all(len(v) == 2 and v[0] == v[1] for v in by_pair.values())  # epoch 2 reuses epoch 1


def test_round_start_margins_fill_the_cache_and_match_the_uncached_pass(comps):
    from metaapo_nemo.trainer.batching import to_microbatches
    from metaapo_nemo.algorithms.rounds import offline_margins

    c, calls = comps
    mbs = lambda: to_microbatches(PAIRS, 2, c.tokenizer.pad_token_id, c.ctx.device, c.layout)  # noqa: E731
    plain = offline_margins(c.policy, c.reference, c.loss, mbs(), c.ctx)
    n = len(calls)
    cached = offline_margins(c.policy, c.reference, c.loss, mbs(), c.ctx, ref_cache=c.ref_cache)
    assert len(c.ref_cache) == len(PAIRS) and len(calls) > n
    n = len(calls)
    again = offline_margins(c.policy, c.reference, c.loss, mbs(), c.ctx, ref_cache=c.ref_cache)
    assert len(calls) == n  # the training steps of the round attach; no second reference pass
    for i in plain:
        assert cached[i] == pytest.approx(plain[i], rel=1e-5, abs=1e-5)
        assert again[i] == cached[i]


def test_round_reference_runs_online_pairs_once_and_equals_the_all_rows_forward(comps):
    """MetaAPO's reference values: offline pairs from the margin pass's cache, online pairs from
    ONE pass per round (`with_online_reference`); the training steps run no reference."""
    from metaapo_nemo.algorithms.online import (
        attach_reference_logps,
        attach_round_reference,
        with_online_reference,
    )
    from metaapo_nemo.algorithms.rounds import OnlinePair, RoundItem, collate_round, offline_margins
    from metaapo_nemo.trainer.batching import to_microbatches

    c, calls = comps
    pad = c.tokenizer.pad_token_id
    offline_margins(c.policy, c.reference, c.loss, to_microbatches(PAIRS, 2, pad, c.ctx.device, c.layout),
                    c.ctx, ref_cache=c.ref_cache)
    # online pairs for every other prompt (other pairs' responses stand in for samples)
    items = [RoundItem(p, OnlinePair(PAIRS[-1 - i].chosen_ids, PAIRS[-1 - i].rejected_ids, 1.0, 0.0)
                       if i % 2 == 0 else None) for i, p in enumerate(PAIRS)]
    n = len(calls)
    items = with_online_reference(c.reference, items, c.ctx, 2, pad, c.layout)
    assert len(calls) - n == 1  # one reference pass over the round's online pairs
    assert all((it.online is None) or (it.online.ref_chosen is not None) for it in items)
    fresh = [collate_round(items[i:i + 4], pad, c.ctx.device) for i in range(0, len(items), 4)]
    cached = [collate_round(items[i:i + 4], pad, c.ctx.device) for i in range(0, len(items), 4)]
    attach_reference_logps(c.reference, fresh)
    n = len(calls)
    attach_round_reference(c.ref_cache, items, cached, on_last_stage=True)
    assert len(calls) == n  # the step attaches: no reference run
    for f, k in zip(fresh, cached):
        has = f.extras["has_online"].bool().repeat_interleave(4)
        real = has | (torch.arange(len(has)) % 4 < 2)  # placeholders' values are never read
        torch.testing.assert_close(k.extras["ref_logps_N"][real], f.extras["ref_logps_N"][real],
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="no reference values"):
        attach_round_reference(c.ref_cache, [RoundItem(PAIRS[0], OnlinePair((5,), (6,), 1.0, 0.0))],
                               cached[:1], on_last_stage=True)
    c.ref_cache.invalidate()
    with pytest.raises(RuntimeError, match="margin pass"):
        attach_round_reference(c.ref_cache, items, cached, on_last_stage=True)
