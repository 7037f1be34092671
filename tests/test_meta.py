"""MetaAPO meta-learner, sampling decisions, T_meta callback and meta-weighted mixing."""

from __future__ import annotations

import math

import pytest
import torch

from metaapo_nemo.losses import DPOLoss
from metaapo_nemo.losses.meta_weighted import mix_losses
from metaapo_nemo.meta import MetaLearner, MetaSettings, MetaUpdateCallback, meta_input, select_for_sampling
from metaapo_nemo.trainer.callbacks import TrainState


def test_release_init_gives_w_at_most_one_half():
    learner = MetaLearner(MetaSettings())
    m = torch.linspace(-20, 20, 101)
    w = learner.weights(m)
    # x = log sigmoid(m) <= 0, fc1 weights 0.1 -> tanh <= 0 -> fc2 sum <= 0 -> w <= 0.5
    assert (w <= 0.5).all() and (w > 0).all()
    assert w[-1].item() == pytest.approx(0.5, abs=1e-3)  # x ~ 0 at a large positive margin
    p = dict(learner.net.named_parameters())
    assert (p["fc1.weight"] == 0.1).all() and (p["fc2.bias"] == 0).all()


def test_meta_gradient_sign_follows_the_lower_loss():
    # online loss lower than offline -> the objective prefers smaller w -> w goes down
    learner = MetaLearner(MetaSettings())
    m = torch.randn(64)
    before = learner.weights(m).mean()
    for _ in range(5):
        learner.record(m, loss_off_B=torch.full((64,), 2.0), loss_on_B=torch.full((64,), 0.5))
        learner.step()
    assert learner.weights(m).mean() < before
    # and the opposite buffer moves it up
    learner2 = MetaLearner(MetaSettings())
    for _ in range(5):
        learner2.record(m, loss_off_B=torch.full((64,), 0.5), loss_on_B=torch.full((64,), 2.0))
        learner2.step()
    assert learner2.weights(m).mean() > before


def test_one_meta_step_equals_hand_computed_adamw():
    s = MetaSettings()
    learner = MetaLearner(s)
    torch.manual_seed(0)
    m, off, on = torch.randn(10), torch.rand(10), torch.rand(10)
    learner.record(m, off, on)
    # independent re-derivation with autograd on a copy + hand-written AdamW
    W1 = torch.full((100, 1), 0.1, requires_grad=True)
    b1 = torch.zeros(100, requires_grad=True)
    W2 = torch.full((1, 100), 0.1, requires_grad=True)
    b2 = torch.zeros(1, requires_grad=True)
    x = torch.log(torch.sigmoid(m * s.beta_in))
    w = torch.sigmoid(torch.tanh(x[:, None] @ W1.t() + b1) @ W2.t() + b2)[:, 0]
    (w * off + (1 - w) * on).mean().backward()
    grads = [W1.grad, b1.grad, W2.grad, b2.grad]
    norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
    scale = min(1.0, s.clip_grad / (norm + 1e-6))
    expected = []
    for p, g, decay in zip((W1, b1, W2, b2), grads, (True, False, True, False)):
        g = g * scale
        p_new = p.detach() * (1 - s.lr * s.weight_decay) if decay else p.detach().clone()
        m1, v1 = (1 - s.betas[0]) * g, (1 - s.betas[1]) * g * g
        mhat, vhat = m1 / (1 - s.betas[0]), v1 / (1 - s.betas[1])
        expected.append(p_new - s.lr * mhat / (vhat.sqrt() + s.eps))
    out = learner.step()
    got = [learner.net.fc1.weight, learner.net.fc1.bias, learner.net.fc2.weight, learner.net.fc2.bias]
    for g_, e in zip(got, expected):
        torch.testing.assert_close(g_.detach(), e, rtol=1e-5, atol=1e-7)
    assert out["meta_loss"] == pytest.approx(float((w * off + (1 - w) * on).mean().detach()), rel=1e-6)
    assert len(learner.buffer) == 0


def test_sampling_decisions_are_seeded_per_prompt():
    w = torch.full((6,), 0.4)
    ids = [10, 11, 12, 13, 14, 15]
    a = select_for_sampling(w, ids, seed=1, round_idx=0)
    assert torch.equal(a, select_for_sampling(w, ids, seed=1, round_idx=0))
    # a prompt's decision does not depend on which other prompts share its batch or order
    b = select_for_sampling(w[:3].flip(0), ids[:3][::-1], seed=1, round_idx=0)
    assert torch.equal(b, a[:3].flip(0))
    assert not torch.equal(select_for_sampling(torch.full((64,), 0.5), list(range(64)), 1, 0),
                           select_for_sampling(torch.full((64,), 0.5), list(range(64)), 1, 1))
    assert select_for_sampling(w, ids, 1, 0, mode="all").all()
    assert not select_for_sampling(w, ids, 1, 0, mode="none").any()
    frac = select_for_sampling(torch.full((4000,), 0.3), list(range(4000)), 7, 0).float().mean()
    assert abs(frac.item() - 0.7) < 0.03  # P(u > w) = 1 - w
    with pytest.raises(ValueError, match="metaapo.sampling"):
        select_for_sampling(w, ids, 1, 0, mode="sometimes")


def test_t_meta_callback_steps_every_t_meta():
    learner = MetaLearner(MetaSettings())
    cb = MetaUpdateCallback(learner, every=3)
    st = TrainState()
    for step in range(1, 7):
        learner.record(torch.randn(4), torch.rand(4), torch.rand(4))
        st.step = step
        cb.on_step_end(st)
        assert len(learner.buffer) == (0 if step % 3 == 0 else 4 * (step % 3))
    assert learner.steps == 2
    frozen = MetaLearner(MetaSettings())
    before = [p.clone() for p in frozen.net.parameters()]
    fcb = MetaUpdateCallback(frozen, every=1, frozen=True)
    frozen.record(torch.randn(4), torch.rand(4), torch.rand(4))
    st.step = 1
    fcb.on_step_end(st)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.net.parameters()))
    assert len(frozen.buffer) == 0


def test_policy_gradient_is_w_weighted_sum_of_the_two_dpo_gradients():
    torch.manual_seed(0)
    dpo = DPOLoss(beta=0.1)
    m_off = torch.randn(5, requires_grad=True)
    m_on = torch.randn(5, requires_grad=True)
    w = torch.rand(5)
    has = torch.tensor([True, True, False, True, False])
    out = mix_losses(dpo.pair_loss(m_off), dpo.pair_loss(m_on), w, has, num_prompts_global=5)
    g_off, g_on = torch.autograd.grad(out.loss, (m_off, m_on))
    # independent: d/dm of -log sigmoid(beta m) = -beta * sigmoid(-beta m)
    d_off = -0.1 * torch.sigmoid(-0.1 * m_off.detach())
    d_on = -0.1 * torch.sigmoid(-0.1 * m_on.detach())
    want_off = torch.where(has, w * d_off, d_off) / 5
    want_on = torch.where(has, (1 - w) * d_on, torch.zeros(5)) / 5
    torch.testing.assert_close(g_off, want_off)
    torch.testing.assert_close(g_on, want_on)
    dropped = mix_losses(dpo.pair_loss(m_off), dpo.pair_loss(m_on), w, has, 3, unselected="drop")
    assert dropped.contributes_B.tolist() == has.tolist()
    assert dropped.per_prompt_B[~has].abs().sum() == 0


def test_meta_input_is_log_sigmoid_of_scaled_margin():
    m = torch.tensor([-3.0, 0.0, 2.0])
    torch.testing.assert_close(meta_input(m, 2.0), torch.log(torch.sigmoid(2.0 * m)))


def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    learner = MetaLearner(MetaSettings(), dp_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    for _ in range(4):
        n = 3 + 2 * rank  # and different buffer sizes
        learner.record(torch.randn(n, generator=gen), torch.rand(n, generator=gen), torch.rand(n, generator=gen))
        learner.step()
    torch.save({k: v.clone() for k, v in learner.net.state_dict().items()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.dist
def test_dp_meta_learners_stay_bitwise_identical_and_use_the_global_mean(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # equals one learner stepping on the union of both ranks' buffers (global mean gradient)
    single = MetaLearner(MetaSettings())
    gens = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for _ in range(4):
        for r in range(2):
            n = 3 + 2 * r
            single.record(torch.randn(n, generator=gens[r]), torch.rand(n, generator=gens[r]),
                          torch.rand(n, generator=gens[r]))
        single.step()
    for k, v in single.net.state_dict().items():
        torch.testing.assert_close(a[k], v, rtol=1e-5, atol=1e-7)
