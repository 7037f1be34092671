"""TRL side of `dpo_step_vs_trl.py`: one DPOTrainer pass over the benchmark pairs.

Runs in its own process (the driver spawns it), so its peak RSS is its own. The pairs are
handed over as token ids (the same `TokenizedPair`s our recipe trains on), so TRL's text
pipeline is bypassed: `_prepare_dataset` is a pass-through for already tokenised rows. The
settings mirror ours: fp32, the same per-device micro-batch and gradient accumulation
(= the same global batch), beta, learning rate, Adam betas, clipping, no weight decay,
sequential order (both sides see the same pairs in the same steps), no eval, no saving,
no logging until the end.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch


def run_trl(job: dict[str, Any], pairs: list) -> dict[str, Any]:
    """One TRL pass; returns timings (seconds) measured around the trainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    timings: dict[str, float] = {"precompute_s": 0.0, "precompute_cpu_s": 0.0}
    step_times: list[float] = []

    class _Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already token ids (prompt_ids / chosen_ids / rejected_ids)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            cpu0, t0 = time.process_time(), time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            timings["precompute_s"] += time.perf_counter() - t0
            timings["precompute_cpu_s"] += time.process_time() - cpu0
            return out

    class _StepTimes(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self._t0)

    path = job["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = Dataset.from_dict({
        "prompt_ids": [list(p.prompt_ids) for p in pairs],
        "chosen_ids": [list(p.chosen_ids) for p in pairs],
        "rejected_ids": [list(p.rejected_ids) for p in pairs],
    })
    micro, global_batch = job["micro_batch"], job["global_batch"]
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, per_device_train_batch_size=micro,
            gradient_accumulation_steps=global_batch // micro, num_train_epochs=1,
            learning_rate=job["lr"], beta=job["beta"], lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
            max_grad_norm=1.0, max_length=None, precompute_ref_log_probs=job["precompute"],
            train_sampling_strategy="sequential", use_cpu=True, seed=job["seed"],
            report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10**6,
            disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            bf16=False, fp16=False,
        )
        t0 = time.perf_counter()
        trainer = _Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                           callbacks=[_StepTimes()])
        timings["init_s"] = time.perf_counter() - t0 - timings["precompute_s"]
        cpu1, t1 = time.process_time(), time.perf_counter()
        trainer.train()
        timings["train_s"] = time.perf_counter() - t1
        timings["cpu_s"] = time.process_time() - cpu1 + timings["precompute_cpu_s"]
    timings["pass_s"] = timings["precompute_s"] + timings["train_s"]
    timings["steps"] = len(step_times)
    timings["step_times"] = step_times
    return timings
