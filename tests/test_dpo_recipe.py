"""The offline DPO recipe end to end on the tiny CPU default, and its step invariants."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from metaapo_nemo import run as R
from metaapo_nemo.config.loader import REPO_ROOT, load_config

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)

_main = partial(R.main, method="dpo")


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={tmp_path}", f"run.cache_dir={tmp_path / 'cache'}",
            "train.progress_bar=off", *extra]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_recipe_trains_and_exports(tmp_path, capsys):
    assert _main(_overrides(tmp_path, "train.max_steps=12")) == 0
    cfg = load_config(None, method="dpo")  # conf/tiny_cpu_dpo.yaml
    assert cfg.rollout is None and cfg.reward is None and cfg.metaapo is None
    run_dir = tmp_path / cfg.run.name
    rows = _metrics(run_dir)
    assert len(rows) == 12
    # pi_theta == pi_ref at step 1: every DPO margin is 0 and the loss is ln 2
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-4)
    assert sum(r["loss"] for r in rows[-4:]) / 4 < rows[0]["loss"] - 0.1
    for key in ("reward_accuracy", "margin", "chosen_reward", "rejected_reward", "grad_norm",
                "lr", "pairs_per_s", "tokens_per_s"):
        assert key in rows[-1]
    assert (run_dir / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert "policy (HF checkpoint)" in out and str(run_dir) in out

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf_final"))
    tok = AutoTokenizer.from_pretrained(str(run_dir / "hf_final"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                  add_generation_prompt=True, return_dict=False)
    assert model(torch.tensor([ids])).logits.shape[-1] == model.config.vocab_size
    assert not list(run_dir.glob("*.tmp"))


def _components(tmp_path, *extra):
    cfg = load_config(None, _overrides(tmp_path, *extra), method="dpo")
    return R.build(cfg, "dpo")


def _first_step_grads(tmp_path, micro: int) -> dict[str, torch.Tensor]:
    from metaapo_nemo.parallel import state
    from metaapo_nemo.trainer.batching import global_batches, rank_microbatches
    from metaapo_nemo.trainer.preference import ReferenceCache, policy_loss_fn

    c = _components(tmp_path, "train.global_batch_size=4", f"train.micro_batch_size={micro}",
                       f"run.name=accum{micro}")
    try:
        batch = next(global_batches(c.pairs, 4, c.cfg.run.seed, 0, True))
        mbs = rank_microbatches(batch, c.plan, 0, c.tokenizer.pad_token_id, c.ctx.device)
        assert len(mbs) == 4 // micro
        ref = ReferenceCache()
        ref.fill(c.reference, mbs)
        ref.attach(mbs, True)
        c.policy.zero_grad()
        outs = c.policy.run(mbs, policy_loss_fn(c.loss, 4), forward_only=False)
        assert sum(o["loss"].item() for o in outs) == pytest.approx(math.log(2), abs=1e-6)
        return c.policy.main_grads()
    finally:
        c.logger.close()
        state.destroy()


def test_microbatch_times_grad_accum_invariance(tmp_path):
    """1 micro-batch of 4 pairs and 4 micro-batches of 1 pair give the same step-1 gradient."""
    g1x4 = _first_step_grads(tmp_path, micro=4)
    g4x1 = _first_step_grads(tmp_path, micro=1)
    assert g1x4.keys() == g4x1.keys()
    for name in g1x4:
        torch.testing.assert_close(g4x1[name], g1x4[name], rtol=1e-5, atol=1e-7, msg=name)
    assert max(g.abs().max().item() for g in g1x4.values()) > 0


def test_precomputed_reference_equals_per_step_reference(tmp_path):
    common = ("train.max_steps=3",)
    assert _main(_overrides(tmp_path, *common, "run.name=ref_step")) == 0
    assert _main(_overrides(tmp_path, *common, "run.name=ref_pre", "reference.precompute=true")) == 0
    a, b = _metrics(tmp_path / "ref_step"), _metrics(tmp_path / "ref_pre")
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-7)
        assert ra["margin"] == pytest.approx(rb["margin"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("recipe", ["tiny_cpu_qwen2", "tiny_cpu_ipo", "tiny_cpu_simpo", "tiny_cpu_kto"])
def test_every_tiny_recipe_runs_two_steps(recipe, tmp_path):
    args = ["--config", f"conf/{recipe}.yaml", *_overrides(tmp_path, "train.max_steps=2",
                                                           "train.save_final_hf=false")]
    assert _main(args) == 0
    cfg = load_config(f"conf/{recipe}.yaml")
    rows = _metrics(tmp_path / cfg.run.name)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def test_dry_run_prints_config_and_layout_without_building(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(R, "build", lambda *a, **k: pytest.fail("dry run must not build anything"))
    assert _main(["--dry-run", *_overrides(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "global_batch_size" in out and "tp" in out and "dp" in out
    assert not (tmp_path / "tiny_cpu").exists()


def test_config_errors_exit_cleanly(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _main(_overrides(tmp_path, "train.lr=1e-3"))
    assert exc.value.code == 2
    assert "optim.lr" in capsys.readouterr().err


def test_bad_data_row_stops_before_training_with_file_row_field(tmp_path, capsys):
    good = json.loads((REPO_ROOT / "metaapo_nemo/data/samples/toy_prefs.jsonl").read_text().splitlines()[0])
    bad = dict(good, rejected=good["chosen"])  # chosen == rejected
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good] * 20 + [bad]) + "\n")
    assert _main(_overrides(tmp_path, f"data.path={data}")) == 2
    err = capsys.readouterr().err
    assert "prefs.jsonl" in err and "row 20" in err and "on_bad_row=skip" in err
    assert not (tmp_path / "tiny_cpu").exists()  # no half-made run directory


def test_missing_data_file_is_a_clear_error(tmp_path, capsys):
    assert _main(_overrides(tmp_path, f"data.path={tmp_path / 'nope.jsonl'}")) == 2
    assert "nope.jsonl" in capsys.readouterr().err
