"""``metaapo-nemo``: one command over the recipes (installed by ``pip install -e .``).

    metaapo-nemo train [--config conf/x.yaml] [--method dpo|metaapo] [a.b=c ...]
    metaapo-nemo plan  [--config conf/x.yaml | --sbatch slurm/x.sbatch] [--world-size N]
    metaapo-nemo generate --model DIR --format alpaca_eval --prompts FILE --out FILE
    metaapo-nemo export RUN_DIR_OR_CHECKPOINT --out DIR [--dtype bfloat16]

Each subcommand is a thin front: ``train`` and ``plan`` are `run.main` (what recipes/dpo.py
and recipes/metaapo.py call) with the method the config states, ``generate`` is
`generate.main` (recipes/generate.py), ``export`` is `export.export_checkpoint`. Under
torchrun or srun: ``torchrun --nproc-per-node 8 -m metaapo_nemo train --config ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

COMMANDS = {
    "train": "train a recipe (the method is the config's `method`, or --method)",
    "plan": "the dry run: resolved config, parallel layout, memory plan per GPU (no GPU needed)",
    "generate": "AlpacaEval / MT-Bench answers with vLLM from an HF checkpoint",
    "export": "a training checkpoint (Megatron, any layout) -> an HF checkpoint",
}


def recipes_table() -> str:
    """The shipped recipes: conf/*.yaml with their method and their first comment line."""
    from metaapo_nemo.config.loader import CONF_DIR, display_path, stated_method
    from metaapo_nemo.config.schema import ConfigError

    rows = []
    for path in sorted(CONF_DIR.glob("*.yaml")):
        try:
            method = stated_method(path) or "?"
        except ConfigError:
            method = "?"
        first = next((ln.lstrip("# ").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        rows.append((display_path(path), method, first[:72] + ("..." if len(first) > 72 else "")))
    if not rows:
        return "  (no conf/ directory beside this installation)"
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {method:<7}  {about}" for name, method, about in rows)


def _top_parser() -> argparse.ArgumentParser:
    commands = "\n".join(f"  {name:<9} {about}" for name, about in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="metaapo-nemo",
        usage="metaapo-nemo {train,plan,generate,export} [-h] ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MetaAPO and the offline DPO family on Megatron-Core, with vLLM rollouts.\n\n"
        f"commands:\n{commands}\n\n"
        "  metaapo-nemo <command> --help   the command's own flags",
        epilog="recipes (conf/; `metaapo-nemo train --config <file>`):\n" + recipes_table()
        + "\n\nexamples:\n"
        "  metaapo-nemo train                                        # the tiny MetaAPO demo on CPU\n"
        "  metaapo-nemo train --config conf/tiny_cpu_dpo.yaml train.max_steps=8\n"
        "  metaapo-nemo plan --sbatch slurm/metaapo_llama31_70b.sbatch  # 70B memory plan, login node\n"
        "  metaapo-nemo export runs/tiny_cpu --out runs/tiny_cpu/hf_latest",
    )


def _method_of(rest: list[str]) -> tuple[str, list[str]]:
    """(method, argv without --method): --method, else the config's (or the sbatch script's
    config's) stated method, else MetaAPO (the default demo)."""
    from metaapo_nemo.config.loader import stated_method
    from metaapo_nemo.config.world import read_sbatch

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", choices=("dpo", "metaapo"))
    pre.add_argument("--config")
    pre.add_argument("--sbatch")
    known, _ = pre.parse_known_args(rest)
    argv = _without(rest, "--method")
    if known.method is not None:
        return known.method, argv
    config = known.config
    if config is None and known.sbatch is not None:
        config = read_sbatch(known.sbatch).recipe
    stated = stated_method(config) if config is not None else None
    if config is not None and stated is None:
        from metaapo_nemo.config.schema import ConfigError

        raise ConfigError(f"{config} states no method: add `method: dpo` or `method: metaapo` to it, "
                          "or pass --method dpo|metaapo")
    return stated or "metaapo", argv


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _train(rest: list[str], dry_run: bool) -> int:
    from metaapo_nemo.config.schema import RECIPES, ConfigError
    from metaapo_nemo.run import main as run_main

    try:
        method, argv = _method_of(rest)
    except ConfigError as exc:
        print(f"metaapo-nemo: config error:\n{exc}", file=sys.stderr)
        return 2
    doc = (f"metaapo-nemo {'plan' if dry_run else 'train'} (method {method}: what {RECIPES[method]} runs). "
           "--method dpo|metaapo overrides the config's `method`.")
    return run_main((["--dry-run"] if dry_run else []) + argv, method=method, doc=doc)


def _export(rest: list[str]) -> int:
    from metaapo_nemo.checkpoint import CheckpointError
    from metaapo_nemo.config.schema import ConfigError
    from metaapo_nemo.export import __doc__ as doc
    from metaapo_nemo.export import export_checkpoint

    p = argparse.ArgumentParser(prog="metaapo-nemo export", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a run directory, its checkpoints/ or a checkpoints/step_N")
    p.add_argument("--out", type=Path, required=True, help="the HF checkpoint directory to write")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the weights (default: as trained)")
    args = p.parse_args(rest)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"metaapo-nemo export: error: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(f"HF checkpoint: {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``metaapo-nemo`` entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        _top_parser().print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("train", "plan"):
        return _train(rest, dry_run=command == "plan")
    if command == "generate":
        from metaapo_nemo.generate import main as generate_main

        return generate_main(rest)
    if command == "export":
        return _export(rest)
    _top_parser().error(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    return 2


def entry() -> int:
    """The installed ``metaapo-nemo`` command (and ``python -m metaapo_nemo``): `main`, with
    preemption signals handled from the first line of a training process (metaapo_nemo.preempt)."""
    if sys.argv[1:2] == ["train"]:
        from metaapo_nemo import preempt

        preempt.install()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
