"""Row layouts (pad / bucket / pack / shared prompt) and THD metadata: pure tensor checks."""

from __future__ import annotations

import pytest
import torch

from metaapo_nemo.data.preference import TokenizedPair
from metaapo_nemo.models.packed_seq import thd_offsets, thd_packed_seq_params
from metaapo_nemo.trainer.rows import RowLayout, build_microbatches, data_tokens, pack_first_fit
from tasks.synthetic import chat_lengths, fixed_lengths, synthetic_pairs

PAD = 0
PAIR = TokenizedPair(7, prompt_ids=(10, 11, 12), chosen_ids=(20, 21), rejected_ids=(30, 31, 32))


def test_shared_prompt_row_tokens_positions_labels_and_mask():
    (mb,) = build_microbatches([PAIR], RowLayout("pad", share_prompt=True), 1, PAD)
    # [p1 p2 | p3 c1 c2 | p3 r1 r2 r3]: the last prompt token opens each branch
    assert mb.input_ids_NT.tolist() == [[10, 11, 12, 20, 21, 12, 30, 31, 32]]
    assert mb.position_ids_NT.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert mb.labels_NT.tolist() == [[11, 12, 20, 21, PAD, 30, 31, 32, PAD]]
    assert mb.loss_mask_NT.tolist() == [[0, 0, 1, 1, 0, 1, 1, 1, 0]]
    sel = mb.loss_mask_NT[0] > 0
    assert mb.seq_index_NT[0][sel].tolist() == [0, 0, 1, 1, 1]  # chosen = 0, rejected = 1
    visible = ~mb.attention_mask_N1TT[0, 0]
    rejected = range(5, 9)
    for q in rejected:  # rejected tokens: shared prefix + own branch, never the chosen branch
        assert visible[q, :2].all() and not visible[q, 2:5].any()
        assert visible[q, 5:q + 1].all() and not visible[q, q + 1:].any()
    for q in range(2, 5):  # chosen tokens: prefix + own branch, causal
        assert visible[q, :q + 1].all() and not visible[q, q + 1:].any()
    assert mb.sequence_lengths().tolist() == [2.0, 3.0]
    assert mb.extras["tokens"] == data_tokens(PAIR) == 11


def test_packed_row_is_block_diagonal_with_restarting_positions():
    other = TokenizedPair(8, (40,), (50, 51), (60,))
    (mb,) = build_microbatches([PAIR, other], RowLayout("pack", pack_tokens=32), 2, PAD)
    assert mb.input_ids_NT.shape[0] == 1 and mb.num_seqs == 4
    blocks = mb.extras["row_blocks"][0]
    assert blocks == [5, 6, 3, 2]
    starts = [0, 5, 11, 14]
    pos = mb.position_ids_NT[0].tolist()
    for start, n in zip(starts, blocks):
        assert pos[start:start + n] == list(range(n))
    visible = ~mb.attention_mask_N1TT[0, 0]
    for (s0, n0) in zip(starts, blocks):
        for (s1, n1) in zip(starts, blocks):
            block = visible[s0:s0 + n0, s1:s1 + n1]
            if s0 == s1:
                assert torch.equal(block, torch.ones(n0, n0, dtype=torch.bool).tril())
            else:
                assert not block.any()
    # targets of sequence q are exactly its response tokens
    sel = mb.loss_mask_NT[0] > 0
    labels, seq = mb.labels_NT[0][sel].tolist(), mb.seq_index_NT[0][sel].tolist()
    order = mb.extras["pair_index"].tolist()
    pairs = {7: PAIR, 8: other}
    for q in range(4):
        pair = pairs[order[q // 2]]
        want = list(pair.chosen_ids if q % 2 == 0 else pair.rejected_ids)
        assert [lab for lab, s in zip(labels, seq) if s == q] == want


@pytest.mark.parametrize("layout", [RowLayout("pad"), RowLayout("bucket"), RowLayout("pack"),
                                    RowLayout("bucket", True), RowLayout("pack", True, pack_tokens=2048)])
def test_every_pair_lands_whole_in_exactly_one_microbatch(layout):
    pairs = synthetic_pairs(12, 300, chat_lengths((4, 60), (2, 60)), seed=1, eos_id=2)
    mbs = build_microbatches(pairs, layout, 3, PAD)
    seen = [i for mb in mbs for i in mb.extras["pair_index"].tolist()]
    assert sorted(seen) == list(range(12))
    assert sum(mb.extras["tokens"] for mb in mbs) == sum(data_tokens(p) for p in pairs)
    by_index = {p.index: p for p in pairs}
    for mb in mbs:  # both responses of every pair are scored in this micro-batch
        lengths = mb.sequence_lengths().tolist()
        for j, idx in enumerate(mb.extras["pair_index"].tolist()):
            p = by_index[idx]
            assert lengths[2 * j:2 * j + 2] == [len(p.chosen_ids), len(p.rejected_ids)]
    if layout.batching == "pack":
        assert all(mb.input_ids_NT.shape[0] == 1 for mb in mbs)
        assert all(mb.input_ids_NT.shape[1] <= (layout.pack_tokens or 10**9) for mb in mbs)


def test_bucket_groups_similar_lengths_and_pads_less():
    pairs = synthetic_pairs(16, 300, chat_lengths((4, 200), (2, 200)), seed=2)
    padded = lambda mbs: sum(mb.input_ids_NT.numel() for mb in mbs)  # noqa: E731
    assert padded(build_microbatches(pairs, RowLayout("bucket"), 2, PAD)) < \
        padded(build_microbatches(pairs, RowLayout("pad"), 2, PAD))


def test_pad_layout_is_the_plain_collation():
    pairs = synthetic_pairs(4, 300, fixed_lengths(5, 3), seed=0)
    mb = build_microbatches(pairs, RowLayout("pad"), 4, PAD)[0]
    assert mb.attention_mask_N1TT is None and mb.position_ids_NT is None and mb.seq_index_NT is None
    assert not mb.select_logits


def test_fixed_length_pads_every_row_and_keeps_padding_to_itself():
    mb = build_microbatches([PAIR], RowLayout("pad", True, fixed_length=12), 1, PAD)[0]
    assert mb.input_ids_NT.shape == (1, 12)
    visible = ~mb.attention_mask_N1TT[0, 0]
    assert not visible[:9, 9:].any() and not visible[9:, :9].any()
    assert visible.diagonal().all()  # no query is ever fully masked


def test_first_fit_decreasing():
    assert pack_first_fit([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    with pytest.raises(ValueError, match="pack_tokens"):
        pack_first_fit([9], 8)


def test_thd_offsets_and_params():
    real, padded = thd_offsets([[5, 6], [3, 2]], row_length=12)
    assert real == [5, 6, 3, 2] and padded == [5, 7, 3, 9]
    real, padded = thd_offsets([[5, 6]], row_length=20, pad_multiple=4)  # e.g. 2 * cp
    assert real == [5, 6] and padded == [8, 12]
    params = thd_packed_seq_params([[5, 6], [3, 2]], row_length=12)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == [0, 5, 11, 14, 16]
    assert params.cu_seqlens_q_padded.tolist() == [0, 5, 12, 15, 24]  # 2 rows x 12 tokens
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == params.max_seqlen_kv == 9
    with pytest.raises(ValueError, match="row_length"):
        thd_offsets([[8, 8]], row_length=12)
    with pytest.raises(ValueError, match="multiple of 8 needs 24"):
        thd_offsets([[3, 3, 3]], row_length=12, pad_multiple=8)


def test_thd_params_from_a_packed_microbatch():
    pairs = synthetic_pairs(6, 300, chat_lengths((4, 30), (2, 30)), seed=4)
    for mb in build_microbatches(pairs, RowLayout("pack", pack_tokens=256), 2, PAD):
        t = mb.input_ids_NT.shape[1]
        params = thd_packed_seq_params(mb.extras["row_blocks"], t)
        assert int(params.cu_seqlens_q_padded[-1]) == mb.input_ids_NT.numel()
        assert int(params.cu_seqlens_q[-1]) == mb.extras["tokens"]  # every real token, once


# ----------------------------------------------------------------- FP8 shapes (issue 19, finding 1)


@pytest.mark.parametrize("batching,share", [("pad", False), ("bucket", False), ("bucket", True),
                                            ("pack", False), ("pack", True)])
def test_fp8_pad_multiple_makes_every_microbatch_fp8_shaped(batching, share):
    """TE's FP8 GEMMs need rows x T to be a multiple of 8 (16 as a GEMM inner dimension): with
    pad_multiple=16 every micro-batch of every layout is, for DPO pairs and MetaAPO rows; the
    padding scores nothing (same masked tokens, same sequence lengths)."""
    from metaapo_nemo.algorithms.rounds import OnlinePair, RoundItem

    pairs = synthetic_pairs(10, 500, chat_lengths((3, 29), (2, 23)), seed=3, eos_id=2)
    items = [RoundItem(p, OnlinePair(pairs[-1 - i].chosen_ids, (5, 6, 7), 1.0, 0.0) if i % 3 else None)
             for i, p in enumerate(pairs)]
    for units in (pairs, items):
        plain = build_microbatches(units, RowLayout(batching, share_prompt=share), 2, PAD)
        fp8 = build_microbatches(units, RowLayout(batching, share_prompt=share, pad_multiple=16), 2, PAD)
        assert len(plain) == len(fp8)
        assert any(mb.input_ids_NT.shape[1] % 16 for mb in plain)  # the case is not vacuous
        for a, b in zip(plain, fp8):
            n, t = b.input_ids_NT.shape
            assert t % 16 == 0 and (n * t) % 8 == 0 and t - a.input_ids_NT.shape[1] < 16
            assert b.loss_mask_NT.sum() == a.loss_mask_NT.sum()
            assert torch.equal(b.sequence_lengths(), a.sequence_lengths())
            assert b.extras["tokens"] == a.extras["tokens"]


def test_layout_from_config_pads_for_fp8_only():
    from types import SimpleNamespace

    from metaapo_nemo.trainer.rows import FP8_TOKEN_MULTIPLE, layout_from_config

    train = SimpleNamespace(share_prompt=False, batching="bucket", pack_tokens=None)
    pp1, pp2 = SimpleNamespace(pp=1, cp=1, tp=1, sequence_parallel=False), SimpleNamespace(pp=2, cp=1, tp=1, sequence_parallel=False)
    fp8 = layout_from_config(SimpleNamespace(train=train, model=SimpleNamespace(fp8="hybrid"), parallel=pp1),
                             "transformer_engine")
    assert fp8.pad_multiple == FP8_TOKEN_MULTIPLE == 16
    bf16 = layout_from_config(SimpleNamespace(train=train, model=SimpleNamespace(fp8=None), parallel=pp1),
                              "transformer_engine")
    assert bf16.pad_multiple == 1
    # absent MetaAPO responses take no row, except under PP (fixed row counts per step)
    assert not bf16.fixed_rows
    assert layout_from_config(SimpleNamespace(train=train, model=SimpleNamespace(fp8=None), parallel=pp2),
                              "transformer_engine").fixed_rows


# ----------------------------------------------------------------- THD packing (issue 34)


def test_sdpa_core_runs_thd_streams_as_varlen_causal_attention():
    """SDPAttention with THD PackedSeqParams == one masked SDPA per sequence (what TE's fused
    THD attention computes), real tokens exact to rounding, with each slot padded (pad_multiple
    4, as context parallelism pads) and GQA; the padding tail is zero."""
    from types import SimpleNamespace

    from metaapo_nemo.models.attention import SDPAttention

    torch.manual_seed(0)
    config = SimpleNamespace(context_parallel_size=1, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                             apply_query_key_layer_scaling=False, attention_dropout=0.0)
    core = SDPAttention(config, 1, None, "self", pg_collection=SimpleNamespace(tp=SimpleNamespace(size=lambda: 1)))
    params = thd_packed_seq_params([[5, 6], [3]], row_length=16, pad_multiple=4)
    t = int(params.cu_seqlens_q_padded[-1])
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    out = core(q, k, v, None, packed_seq_params=params)
    assert out.shape == (t, 32)
    real, slots = params.cu_seqlens_q.tolist(), params.cu_seqlens_q_padded.tolist()
    for i in range(len(real) - 1):
        s, n = slots[i], real[i + 1] - real[i]
        qi, ki, vi = (x[s:s + n].transpose(0, 1) for x in (q, k, v))
        ki, vi = ki.repeat_interleave(2, dim=0), vi.repeat_interleave(2, dim=0)
        want = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=True)
        torch.testing.assert_close(out[s:s + n], want.transpose(0, 1).reshape(n, 32), rtol=1e-6, atol=1e-6)
        assert not out[s + n:slots[i + 1]].any()
    with pytest.raises(ValueError, match="cu_seqlens end"):
        core(q[:-1], k[:-1], v[:-1], None, packed_seq_params=params)


def _cfg_ns(batching="pack", share=False, pack_format="auto", attention="sdpa", cp=1, fp8=None, tp=1, sp=False):
    from types import SimpleNamespace

    return SimpleNamespace(train=SimpleNamespace(batching=batching, share_prompt=share, pack_tokens=None,
                                                 pack_format=pack_format, attention=attention),
                           model=SimpleNamespace(fp8=fp8),
                           parallel=SimpleNamespace(pp=1, cp=cp, tp=tp, sequence_parallel=sp))


def test_packed_rows_go_as_thd_on_the_te_spec_and_what_thd_cannot_run_is_refused():
    from metaapo_nemo.trainer.rows import layout_from_config

    te = layout_from_config(_cfg_ns(), "transformer_engine")  # auto: THD on the TE spec
    assert te.batching == "pack" and te.thd and not te.explicit_positions
    fp8 = layout_from_config(_cfg_ns(fp8="hybrid"), "transformer_engine")
    assert fp8.thd and fp8.pad_multiple == 16  # FP8's shape rule: the stream a multiple of 16
    local = layout_from_config(_cfg_ns(), "local")  # auto: the block-diagonal mask on CPU
    assert not local.thd and local.explicit_positions
    assert layout_from_config(_cfg_ns(pack_format="thd"), "local").thd  # the GPU's path on the CPU
    assert not layout_from_config(_cfg_ns(batching="bucket", pack_format="thd"), "local").thd
    refused = {
        "share_prompt=true needs an arbitrary": (_cfg_ns(share=True), "transformer_engine"),
        "pack_format=mask needs an arbitrary": (_cfg_ns(pack_format="mask"), "transformer_engine"),
        "cannot express shared-prompt": (_cfg_ns(share=True, pack_format="thd"), "local"),
        "needs train.attention=sdpa": (_cfg_ns(pack_format="thd", attention="megatron"), "local"),
        "parallel.cp=2: context parallelism splits": (_cfg_ns(cp=2, batching="bucket"), "transformer_engine"),
        "parallel.cp=2: context .* train.attention=sdpa": (_cfg_ns(cp=2), "local"),  # auto: mask on CPU
    }
    for message, (cfg, impl) in refused.items():
        with pytest.raises(ValueError, match=message):
            layout_from_config(cfg, impl)


def test_context_parallel_shares_are_megatrons_load_balanced_chunks():
    """cp_partition_index: 2 x cp chunks per slot, rank r keeps r and 2cp-1-r; the ranks' shares
    cover the stream once, and each share's positions are the ones megatron's THD RoPE gives
    that rank (`_get_thd_freqs_on_this_cp_rank`)."""
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    from metaapo_nemo.models.packed_seq import cp_partition_index

    slots = [8, 4, 16]
    for cp in (1, 2):
        shares = [cp_partition_index(slots, cp, r) for r in range(cp)]
        assert torch.equal(torch.cat(shares).sort().values, torch.arange(sum(slots)))
        for r, share in enumerate(shares):
            start = 0
            for i, length in enumerate(slots):
                mine = share[(share >= start) & (share < start + length)] - start
                rope = _get_thd_freqs_on_this_cp_rank(r, cp, torch.zeros(length // cp), torch.arange(64))
                assert torch.equal(mine, rope), (cp, r, i)
                start += length
    assert cp_partition_index([8, 4], 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    with pytest.raises(ValueError, match="slot 1 has 6 tokens, not a multiple of 2 x cp = 4"):
        cp_partition_index([8, 6], 2, 0)


def test_thd_rows_under_context_parallelism_pad_every_sequence_to_2cp():
    """cp=2: every sequence slot (and so the row) a multiple of 4, FP8 rows a multiple of 16 x cp;
    the padding scores nothing, so the sequences' response tokens and targets are unchanged."""
    from metaapo_nemo.models.packed_seq import thd_offsets
    from metaapo_nemo.trainer.batching import to_microbatches
    from metaapo_nemo.trainer.rows import layout_from_config

    cp2 = layout_from_config(_cfg_ns(cp=2), "transformer_engine")
    assert cp2.thd and (cp2.seq_multiple, cp2.pad_multiple) == (4, 4)
    fp8 = layout_from_config(_cfg_ns(cp=2, fp8="hybrid"), "transformer_engine")
    assert (fp8.seq_multiple, fp8.pad_multiple) == (4, 32)
    assert layout_from_config(_cfg_ns(cp=2, pack_format="thd"), "local").seq_multiple == 4
    # sequence parallelism: a row's tokens split over TP, so rows (each CP share) are multiples of tp
    assert layout_from_config(_cfg_ns(tp=2, sp=True), "transformer_engine").pad_multiple == 2
    assert layout_from_config(_cfg_ns(tp=2, sp=False), "transformer_engine").pad_multiple == 1
    assert layout_from_config(_cfg_ns(tp=4, sp=True, cp=2), "transformer_engine").pad_multiple == 8
    assert layout_from_config(_cfg_ns(tp=2, sp=True, fp8="hybrid"), "transformer_engine").pad_multiple == 16
    pairs = synthetic_pairs(6, 250, chat_lengths((3, 40), (2, 40)), seed=3, eos_id=2)
    plain = to_microbatches(pairs, 2, 0, torch.device("cpu"), RowLayout("pack", thd=True))
    for layout in (cp2, fp8):
        mbs = to_microbatches(pairs, 2, 0, torch.device("cpu"), layout)
        for mb in mbs:
            t = mb.input_ids_NT.shape[1]
            assert t % layout.pad_multiple == 0
            assert all(n % 4 == 0 for n in mb.extras["row_blocks"][0])
            _, slots = thd_offsets(mb.extras["row_blocks"], t)
            assert all(n % 4 == 0 for n in slots)
        assert len(mbs) <= len(pairs)

        assert _scored_targets(mbs) == _scored_targets(plain) and len(_scored_targets(plain)) == 12


def _scored_targets(mbs) -> dict[tuple[int, int], list[int]]:
    """(pair index, 0 chosen / 1 rejected) -> the targets scored for it, in row order."""
    out: dict[tuple[int, int], list[int]] = {}
    for mb in mbs:
        pairs = mb.extras["pair_index"].tolist()
        for j in (mb.loss_mask_NT[0] > 0).nonzero().flatten().tolist():
            q = int(mb.seq_index_NT[0, j])
            out.setdefault((pairs[q // 2], q % 2), []).append(int(mb.labels_NT[0, j]))
    return out


def test_a_thd_packed_microbatch_runs_the_varlen_path(tiny_llama, single_ctx, monkeypatch):
    """The model gets PackedSeqParams and no mask (the THD path, not the mask path), and the
    sequence log-probs equal the mask-packed ones (tests/test_layout_equality.py: gradients)."""
    from metaapo_nemo.models import attention
    from metaapo_nemo.models.arch import load_arch
    from metaapo_nemo.models.megatron_model import BuildOptions
    from metaapo_nemo.models.policy import MegatronLM
    from metaapo_nemo.trainer.batching import to_microbatches
    from metaapo_nemo.trainer.preference import reference_loss_fn

    pairs = synthetic_pairs(6, 250, chat_lengths((3, 40), (2, 40)), seed=3, eos_id=2)
    seen = []
    real_thd = attention.SDPAttention._thd
    monkeypatch.setattr(attention.SDPAttention, "_thd",
                        lambda self, q, k, v, p: seen.append(p.cu_seqlens_q.tolist()) or real_thd(self, q, k, v, p))
    out = {}
    for thd in (True, False):
        layout = RowLayout("pack", thd=thd)
        model = MegatronLM(load_arch(tiny_llama), single_ctx, tiny_llama,
                           BuildOptions(explicit_positions=layout.explicit_positions, packed_thd=thd, attention="sdpa"))
        mbs = to_microbatches(pairs, 2, 0, single_ctx.device, layout)
        out[thd] = torch.cat([o["seq_logps_N"] for o in model.run(mbs, reference_loss_fn, forward_only=True)])
    assert seen and all(len(cu) > 2 for cu in seen)  # several sequences per packed row
    torch.testing.assert_close(out[True], out[False], rtol=1e-6, atol=1e-6)
    # a THD row carries no T x T mask; a model built without packed_thd refuses it (its causal
    # default would let the row's sequences attend across each other)
    mbs = to_microbatches(pairs, 2, 0, single_ctx.device, RowLayout("pack", thd=True))
    assert all(mb.attention_mask_N1TT is None and mb.extras["row_blocks"] for mb in mbs)
    plain = MegatronLM(load_arch(tiny_llama), single_ctx, tiny_llama, BuildOptions(attention="sdpa"))
    with pytest.raises(ValueError, match="without BuildOptions\\(packed_thd=True\\)"):
        plain.run(mbs, reference_loss_fn, forward_only=True)


def test_the_dry_run_names_the_row_layout_of_each_spec():
    from metaapo_nemo.trainer.rows import describe_rows

    line = describe_rows(_cfg_ns(share=None))
    assert line.startswith("rows: Transformer Engine spec (GPU): packed rows as THD PackedSeqParams")
    assert "local spec (CPU): packed rows with a block-diagonal mask" in line
    assert "each pair's prompt computed once" in line  # share_prompt null: on with the local spec
    refused = describe_rows(_cfg_ns(share=True))
    assert "Transformer Engine spec (GPU): refused (train.share_prompt=true needs" in refused
    cp = describe_rows(_cfg_ns(cp=2, pack_format="thd"))
    assert cp.count("every sequence padded to a multiple of 4 and split over the parallel.cp=2 ranks") == 2


def test_thd_on_transformer_engine_needs_te_1_10(monkeypatch):
    import importlib.metadata

    from metaapo_nemo.config.schema import ConfigError
    from metaapo_nemo.trainer.setup import _require_te_for_thd

    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "1.9.0+abc")
    with pytest.raises(ConfigError, match=r"transformer-engine >= 1.10 \(found 1.9.0\+abc"):
        _require_te_for_thd()
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "2.20.2")
    _require_te_for_thd()  # the GPU set's TE


def test_the_dry_run_prints_the_rows_line(capsys):
    from metaapo_nemo.run import main

    assert main(["--dry-run"], method="metaapo") == 0  # conf/tiny_cpu.yaml: packed rows
    assert "\nrows: Transformer Engine spec (GPU): packed rows as THD" in capsys.readouterr().out


def test_rows_mark_their_padding_for_the_moe_router():
    """padding_NT: padded rows' tails, shared-prompt placeholders (a MetaAPO prompt without an
    online pair) and row padding are True; every token of a sequence is False."""
    from metaapo_nemo.trainer.batching import to_microbatches

    pairs = synthetic_pairs(4, 250, chat_lengths((3, 40), (2, 40)), seed=3, eos_id=2)
    pad = to_microbatches(pairs, 2, 0, torch.device("cpu"), RowLayout("pad"))[0]
    lengths = [len(p.prompt_ids) + len(r) for p in pairs[:2] for r in (p.chosen_ids, p.rejected_ids)]
    assert (~pad.padding_NT).sum(dim=1).tolist() == lengths
    shared = to_microbatches(pairs, 2, 0, torch.device("cpu"), RowLayout("pad", share_prompt=True))[0]
    assert (~shared.padding_NT).sum(dim=1).tolist() == [len(p.prompt_ids) - 1 + len(p.chosen_ids) + 1
                                                          + len(p.rejected_ids) + 1 for p in pairs[:2]]
    longer = shared.padded_to(shared.input_ids_NT.shape[1] + 3, 0)
    assert longer.padding_NT[:, -3:].all() and torch.equal(longer.padding_NT[:, :-3], shared.padding_NT)
    from metaapo_nemo.trainer.rows import _placeholder_block, blocks_to_microbatch

    placeholder = blocks_to_microbatch([[_placeholder_block(0)]], pairs[:1], 0)
    assert placeholder.padding_NT.all()
