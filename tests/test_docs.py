"""The docs cannot go stale: every shell command in README.md and docs/*.md is checked.

Fenced ``bash`` / ``sh`` blocks are read command by command (backslash continuations joined):

- cheap commands run in-process: ``metaapo-nemo plan ...``, anything with ``--help`` or
  ``--dry-run``, and documented failures (a trailing ``# exit N`` comment); they must exit
  0, or that N;
- every other command must start with a program the project ships or documents (a Makefile
  target, a script or module of this repo, ``sbatch`` of an existing script, ...);
- in every command, each repo path (conf/, slurm/, recipes/, ...) must exist and each
  ``a.b=c`` override must be a key of the schema.

Markdown links to files of the repo must resolve too, and docs/metaapo.md's key table must
list every ``metaapo.*`` key with its schema default.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from metaapo_nemo import cli
from metaapo_nemo import run as R
from metaapo_nemo.config.loader import REPO_ROOT, schema_paths
from metaapo_nemo.config.schema import MetaAPOConfig

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
REPO_DIRS = ("conf/", "slurm/", "recipes/", "benchmarks/", "tests/", "metaapo_nemo/", "tasks/", "docs/")
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))
SHELL_BUILTINS = {"pip", "cd", "export"}


def commands(path: Path) -> list[tuple[str, str, int | None]]:
    """(where, command, expected exit status or None) of each shell command in `path`."""
    out = []
    text = path.read_text()
    name = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path.name
    for block in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        line0 = text[: block.start()].count("\n") + 2
        joined = block.group(1).replace("\\\n", " ")
        for i, line in enumerate(joined.splitlines()):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            status = re.search(r"#\s*exit (\d+)\s*$", line)
            for part in _split(line):
                out.append((f"{name}:{line0 + i}", part,
                            int(status.group(1)) if status else None))
    return out


def _split(line: str) -> list[str]:
    """A line's commands (`a; b`), without its trailing comment."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
    lexer.whitespace_split, lexer.commenters = True, "#"
    parts, current = [], []
    for token in lexer:
        if token == ";":
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    return [shlex.join(p) for p in parts if p]


ALL = [c for doc in DOCS for c in commands(doc)]


def test_the_docs_have_commands_to_check():
    assert len(ALL) > 30 and {Path(w.split(":")[0]).name for w, _, _ in ALL} >= {
        "README.md", "quickstart.md", "scaling_out.md", "troubleshooting.md", "metaapo.md", "own_model_and_data.md"}


def _program(tokens: list[str]) -> list[str]:
    while tokens and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):  # VAR=value cmd
        tokens = tokens[1:]
    return tokens


def _is_cheap(tokens: list[str]) -> bool:
    return "--help" in tokens or "--dry-run" in tokens or tokens[1:2] == ["plan"]


def _run_in_process(tokens: list[str]) -> int:
    prog = Path(tokens[0]).name
    try:
        if prog == "metaapo-nemo":
            return cli.main(tokens[1:])
        if prog in ("python", "python3") and tokens[1].startswith("recipes/"):
            method = Path(tokens[1]).stem
            if method == "generate":
                from metaapo_nemo.generate import main as generate_main

                return generate_main(tokens[2:])
            return R.main(tokens[2:], method=method)
    except SystemExit as exc:
        return int(exc.code or 0)
    raise AssertionError(f"no in-process runner for {tokens[0]}")


def _check_static(tokens: list[str]) -> None:
    prog = Path(tokens[0]).name
    args = tokens[1:]
    if prog == "make":
        assert set(args) <= MAKE_TARGETS, f"make targets {set(args) - MAKE_TARGETS} not in the Makefile"
    elif prog == "metaapo-nemo":
        assert args and args[0] in cli.COMMANDS, f"metaapo-nemo has no command {args[:1]}"
    elif prog in ("python", "python3", "torchrun"):
        if "-m" in args:
            module = args[args.index("-m") + 1]
            if module != "pytest":
                top = module.split(".")[0]
                assert top in ("metaapo_nemo", "tasks", "benchmarks"), module
                assert (REPO_ROOT / module.replace(".", "/")).with_suffix(".py").exists() or \
                    (REPO_ROOT / module.replace(".", "/") / "__main__.py").exists(), module
        else:
            script = next(a for a in args if a.endswith(".py"))
            assert (REPO_ROOT / script).is_file(), script
    elif prog == "sbatch":
        script = next(a for a in args if a.endswith(".sbatch"))
        assert (REPO_ROOT / script).is_file(), script
    elif prog == "docker":  # the container recipe: the Dockerfile it names exists
        assert args[0] == "build" and "-f" in args, tokens
        assert (REPO_ROOT / args[args.index("-f") + 1]).is_file(), args[args.index("-f") + 1]
    elif prog == "enroot":  # turns the built image into a squashfs for pyxis
        assert args[0] == "import" and args[1].startswith("dockerd://"), tokens
    elif tokens[0].startswith(REPO_DIRS):
        assert (REPO_ROOT / tokens[0]).is_file(), tokens[0]
    else:
        assert prog in SHELL_BUILTINS, f"unknown program {tokens[0]!r}: teach tests/test_docs.py about it"


@pytest.mark.parametrize("where,command,status", ALL, ids=[w for w, _, _ in ALL])
def test_doc_command(where, command, status, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(var, raising=False)
    check_command(where, command, status, capsys)


def test_the_checker_catches_stale_commands(tmp_path, capsys):
    doc = tmp_path / "x.md"
    doc.write_text("```bash\nmake nope; make demo\nmetaapo-nemo plan --config conf/gone.yaml\n"
                   "metaapo-nemo train --config conf/tiny_cpu.yaml optim.nope=1\n"
                   "metaapo-nemo plan --config conf/tiny_cpu.yaml  # exit 2\nfrobnicate\n```\n")
    found = [(c, s) for _, c, s in commands(doc)]
    assert found[:2] == [("make nope", None), ("make demo", None)] and found[4][1] == 2
    for command, status in found[:1] + found[2:]:
        with pytest.raises(AssertionError):
            check_command("x.md", command, status, capsys)
    check_command("x.md", "make demo", None, capsys)


def check_command(where: str, command: str, status: int | None, capsys) -> None:
    tokens = _program(shlex.split(command))
    for token in tokens:
        if token.startswith(REPO_DIRS) and not token.startswith("slurm/testing/cluster.sh"):
            assert (REPO_ROOT / token.split(":")[0]).exists(), f"{where}: {token} does not exist"
        key = re.fullmatch(r"'?([a-z_]+(?:\.[a-z_0-9]+)+)=.*", token)
        if key and key.group(1).split(".")[0] in schema_paths() and status is None:
            assert key.group(1) in schema_paths(), f"{where}: {key.group(1)} is not a config key"
    if _is_cheap(tokens) or status is not None:  # a documented failure stops before building anything
        rc = _run_in_process(tokens)
        err = capsys.readouterr().err
        assert rc == (status or 0), f"{where}: `{command}` exited {rc}\n{err[-2000:]}"
    else:
        _check_static(tokens)


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: link to {target} is broken"


def test_metaapo_doc_lists_every_key_with_its_default():
    text = (REPO_ROOT / "docs" / "metaapo.md").read_text()
    rows = dict(re.findall(r"^\| `metaapo\.(\w+)` \| ([^|]+) \|", text, re.M))
    assert set(rows) == set(MetaAPOConfig.model_fields), "docs/metaapo.md's key table vs the schema"
    for key, shown in rows.items():
        default = MetaAPOConfig.model_fields[key].default
        value = shown.strip().strip("`")
        if isinstance(default, bool):
            assert value == str(default).lower(), key
        elif isinstance(default, (int, float)):
            assert float(value) == default, key
        else:
            assert value == default, key
