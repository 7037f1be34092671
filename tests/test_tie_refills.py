"""Tie refills (`rollout.tie_refills`): a prompt whose K samples give no pair gets K more,
best/worst is picked over all of them, only new texts are scored, and the cost is counted."""

from __future__ import annotations

from types import SimpleNamespace

from metaapo_nemo.algorithms.online import online_pairs, refill_settings
from metaapo_nemo.rollout.generator import PromptSamples, Sample, SamplingSettings, derive_seed


class _Rollout:
    """Prompt 0 always ties (every sample 'same'); prompt 1's first draw ties, its refill does
    not; prompt 2 pairs at once. The text depends on the sample seed, as in a real engine."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def wake(self): ...
    def sleep(self): ...
    def push_megatron(self, *a):
        return SimpleNamespace(bytes=0)  # a RefitStats' byte count

    def generate(self, batch, settings, policy_step):
        self.calls.append(batch.keys)
        out = []
        for key, ids in zip(batch.keys, batch.prompt_ids):
            first = settings.seed == 0
            samples = []
            for k in range(settings.n):
                text = "same" if key == 0 or (key == 1 and first) else f"{key}:{k}:{derive_seed(settings.seed, batch.round, key, k) % 97}"
                samples.append(Sample(k, (50 + k,) if text == "same" else (5 + k,), text, "stop", (-1.0,)))
            out.append(PromptSamples(key, ids, tuple(samples)))
        return out


class _Reward:
    def __init__(self):
        self.texts: list[str] = []

    def score(self, prompts, responses):
        self.texts += list(responses)
        return [0.0 if r == "same" else float(int(r.split(":")[1])) for r in responses]


def _pair(i: int):
    return SimpleNamespace(index=i, prompt_ids=(1, 2, 3 + i), messages=lambda: [{"role": "user", "content": "x"}])


def _cfg(refills: int):
    return SimpleNamespace(rollout=SimpleNamespace(refit_bucket_mb=1, tie_refills=refills, truncated="keep"), lora=None,
                           reward=SimpleNamespace(batch_size=8), metaapo=SimpleNamespace(prompts_per_chunk=0))


CTX = SimpleNamespace(dims=SimpleNamespace(world_size=1), rank=0)
POLICY = SimpleNamespace(modules=lambda: [], arch=None)
SETTINGS = SamplingSettings(n=4, seed=0)


def _run(refills: int):
    rollout, reward = _Rollout(), _Reward()
    report = online_pairs([_pair(i) for i in range(3)], rollout, reward, POLICY, SETTINGS, _cfg(refills),
                          round_idx=0, policy_step=0, ctx=CTX)
    return report, rollout, reward


def test_no_refill_is_the_papers_behaviour():
    report, rollout, reward = _run(0)
    assert sorted(report.pairs) == [2] and len(rollout.calls) == 1
    c = report.counters
    assert (c.pairs, c.ties_all_equal, c.refill_prompts, c.samples_generated, c.samples_scored) == (1, 2, 0, 12, 12)


def test_refills_resample_tied_prompts_and_count_the_cost():
    report, rollout, reward = _run(2)
    # draw 1: all three; refill 1: prompts 0 and 1 (1 now pairs); refill 2: prompt 0 only (ties again)
    assert rollout.calls == [(0, 1, 2), (0, 1), (0,)]
    assert sorted(report.pairs) == [1, 2]
    c = report.counters
    assert (c.pairs, c.ties_all_equal, c.ties_same_text, c.too_few_candidates) == (2, 1, 0, 0)
    assert (c.prompts_generated, c.refill_prompts) == (3 + 2 + 1, 3)
    assert (c.samples_generated, c.refill_samples) == (12 + 8 + 4, 12)
    assert c.samples_scored == 24 == len(reward.texts)  # each text scored once, earlier ones reused
    # best/worst over all 8 samples: the refill's best, the first draw's (lowest index) worst
    p1 = report.pairs[1]
    assert (p1.chosen_ids, p1.chosen_reward, p1.rejected_ids, p1.rejected_reward) == ((8,), 3.0, (50,), 0.0)


def test_refill_seeds_differ_per_attempt_and_repeat_across_runs():
    a, b = refill_settings(SETTINGS, 3, 1), refill_settings(SETTINGS, 3, 2)
    assert len({SETTINGS.seed, a.seed, b.seed}) == 3 and a == refill_settings(SETTINGS, 3, 1)
    unseeded = SamplingSettings(n=4, seed=None)
    assert refill_settings(unseeded, 3, 1) is unseeded
    first, _, _ = _run(2)
    again, _, _ = _run(2)
    assert first.pairs == again.pairs


def test_a_scored_chunk_keeps_only_its_unpaired_prompts_samples():
    """What a rank holds of a round (the planner's host plan): once a chunk is scored its
    samples go, except those of prompts without a pair (a refill adds K to them); the pairs
    keep token ids and scores only."""
    import gc
    import weakref

    class Watched(_Rollout):
        def __init__(self):
            super().__init__()
            self.refs: dict[int, list] = {}
            self.alive_at_refill: dict[int, int] = {}

        def generate(self, batch, settings, policy_step):
            if settings.seed != 0 and not self.alive_at_refill:  # the first refill: every chunk scored
                gc.collect()
                self.alive_at_refill = {k: sum(r() is not None for r in refs) for k, refs in self.refs.items()}
            out = super().generate(batch, settings, policy_step)
            if settings.seed == 0:
                for group in out:
                    self.refs[group.key] = [weakref.ref(s) for s in group.samples]
            return out

    cfg = _cfg(2)
    cfg.metaapo.prompts_per_chunk = 1  # three chunks of one prompt
    rollout, reward = Watched(), _Reward()
    report = online_pairs([_pair(i) for i in range(3)], rollout, reward, POLICY, SETTINGS, cfg,
                          round_idx=0, policy_step=0, ctx=CTX)
    assert rollout.calls == [(0,), (1,), (2,), (0, 1), (0,)]
    # prompt 2 paired in its chunk: none of its 4 samples is held; 0 and 1 wait for a refill
    assert rollout.alive_at_refill == {0: 4, 1: 4, 2: 0}
    assert sorted(report.pairs) == [1, 2] and report.pairs == _run(2)[0].pairs  # chunking changes no pair
