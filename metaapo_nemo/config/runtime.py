"""The sections about how a run is recorded, checkpointed, checked, logged and evaluated
(``run``, ``checkpoint``, ``planner``, ``logging``, ``eval``). Part of the schema: ``Config``
(config/schema.py) holds them, and their defaults live here and nowhere else."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from metaapo_nemo.config.base import _Section


class RunConfig(_Section):
    """Where and how a run is recorded."""

    name: str = Field("run", min_length=1)
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 1234
    cache_dir: str = ".cache"  # where tiny models are built and cached
    # false: the terminal shows the run's own lines and library WARNINGs (vLLM, megatron,
    # transformers); their INFO records go to run_dir/log.txt. true: everything on the terminal.
    verbose: bool = False


class CheckpointConfig(_Section):
    """Checkpoints, resume, preemption and non-finite guards (metaapo_nemo/checkpoint.py).

    A checkpoint is a directory run_dir/checkpoints/step_<N>: the policy (and optimiser,
    scheduler) as a megatron distributed checkpoint that loads onto any TP/PP layout, the
    per-round reference when it moves, every rank's meta-learner/RNG/cache state, the
    trainer position, and a manifest with every file's size and SHA-256, written last;
    the directory is renamed into place and `latest` updated only after that.
    """

    every_steps: int | None = Field(None, gt=0)  # None: only on preemption / at the end
    keep_last: int = Field(2, gt=0)  # older checkpoints are deleted once a newer one is good
    save_at_end: bool = True
    resume: str = "auto"  # auto: the newest good checkpoint of this run dir; never; or a path
    verify: Literal["checksum", "size"] = "checksum"  # what loading checks against the manifest
    # A non-finite loss or gradient norm: skip the update (counted, logged; stop after
    # max_skips in a row) or stop at once. Either way the bad state is never saved.
    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_skips: int = Field(3, gt=0)
    requeue_exit_code: int = Field(85, ge=1, le=255)  # SIGTERM/SIGUSR1: save, exit with this
    # Manifest checksum; every rank hashes the files it wrote (benchmarks/checksum_bench.py).
    checksum: Literal["sha256", "blake2b", "crc32", "adler32"] = "sha256"
    # Save barrier timeout in seconds; null: sized from the largest rank's share and
    # fs_write_gbps (checkpoint.barrier_timeout: max(600, 3 x (write + hash time))).
    barrier_timeout_s: float | None = Field(None, gt=0)
    # Stated per-rank write bandwidth of the checkpoint file system (GB/s); also what the
    # sbatch USR1 lead time is derived from (docs/checkpoint_sizing.md).
    fs_write_gbps: float = Field(0.5, gt=0)


class PlannerConfig(_Section):
    """Per-GPU and per-node memory check (metaapo_nemo/planner/): printed by --dry-run, enforced at
    start-up on GPU machines."""

    gpu_memory_gib: float = Field(80.0, gt=0)  # H100 80GB
    # Host memory of one node (GiB) the ranks on it share: the offloaded reference and reward
    # model, vLLM's sleeping weights, the round's pairs and samples, a checkpoint's optimizer
    # gather. 1024 is below every 8 x H100 node sold (1.8-2 TiB); set the nodes' memory, or
    # the job's --mem.
    host_memory_gib: float = Field(1024.0, gt=0)
    on_exceed: Literal["error", "warn"] = "error"


class LoggingConfig(_Section):
    """Experiment trackers beside run_dir/metrics.jsonl and rounds.jsonl (always written):
    each logs every step's and every round's metrics and the resolved config, main rank
    only (metaapo_nemo/trainer/trackers.py)."""

    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"])
    wandb_project: str = "metaapo_nemo"
    wandb_entity: str | None = None  # null: the account's default entity
    # null: the WANDB_MODE environment variable, else online; offline writes run_dir/wandb/
    # for `wandb sync` later (compute nodes without internet)
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    # MLflow (the [mlflow] extra): null takes MLFLOW_TRACKING_URI, else a file store in
    # run_dir/mlruns (`mlflow ui --backend-store-uri run_dir/mlruns`); a server: http://host:5000
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "metaapo_nemo"


class EvalConfig(_Section):
    """Evaluation at the end of training: the function ``task`` names (metaapo_nemo/evals.py),
    e.g. tasks.ifeval_eval:evaluate_run (held-out IFEval-style prompts, greedy + sampled,
    before/after), which reads the settings below."""

    task: str  # a name given to evals.register_eval, or "module:function"
    num_prompts: int = Field(64, gt=0)  # held-out prompts (templates and topics unseen in training)
    # The first held-out prompt used: prompts [first_prompt, first_prompt + num_prompts) of the
    # seeded held-out list, so disjoint splits (a tuning split beside the final one) share a seed.
    first_prompt: int = Field(0, ge=0)
    seed: int = 0  # prompt generation and sampling seed
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)  # the sampled evaluation (greedy always runs too)
    top_p: float = Field(1.0, gt=0, le=1)
    samples_per_prompt: int = Field(2, gt=0)
    examples: int = Field(5, ge=0)  # prompts shown with responses before/after in summary.md
    cache_before: bool = True  # reuse the initial checkpoint's scores (run.cache_dir/<the task>)
    # Also evaluate every N optimiser steps during training (a gold-vs-steps curve: the task's
    # eval_curve.jsonl); each point costs one evaluation of the policy. None: at the end only.
    every_steps: int | None = Field(None, gt=0)
