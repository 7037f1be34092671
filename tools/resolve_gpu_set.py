"""Re-runs pip's resolution of the H100 set and compares it with constraints-gpu.txt.

    python tools/resolve_gpu_set.py --python /path/to/python3.12      # or: make constraints-gpu-check

In a throwaway virtual environment of the given Python 3.12, `pip install --dry-run --report`
of the GPU environment's install command (the project with ``[gpu,test,wandb,mlflow]``, under
``-c constraints-gpu.txt``): pip must find one consistent set (it downloads the wheels, and
builds Transformer Engine's torch sdist's metadata; ~1.5 GB the first time), and that set must
be exactly the file's pins - nothing unpinned, nothing pinned that is not installed. No GPU is
needed. Exit status 0 when both hold; prints the result with the date for the record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRAS = "gpu,test,wandb,mlflow"


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec:
            name, version = spec.split("==")
            out[canon(name)] = version
    return out


def resolve(python: str, constraints: Path) -> dict[str, str]:
    """{package: version} pip resolves for the GPU install command under `constraints`."""
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        vpy = str(venv / "bin" / "python")
        subprocess.run([vpy, "-m", "pip", "install", "-q", "--upgrade", "pip>=24"], check=True)
        report = Path(tmp) / "report.json"
        cmd = [vpy, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--report", str(report),
               "-c", str(constraints), "-e", f"{REPO}[{EXTRAS}]"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"pip could not resolve the GPU set (exit {proc.returncode})")
        data = json.loads(report.read_text())
    return {canon(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]
            if canon(i["metadata"]["name"]) != "metaapo-nemo"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="a Python 3.12 interpreter")
    ap.add_argument("--constraints", type=Path, default=REPO / "constraints-gpu.txt")
    args = ap.parse_args()
    version = subprocess.run([args.python, "-c", "import sys; print(sys.version.split()[0])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if not version.startswith("3.12"):
        raise SystemExit(f"{args.python} is Python {version}; the GPU set is for Python 3.12")
    resolved, pinned = resolve(args.python, args.constraints), pins(args.constraints)
    unpinned = sorted(set(resolved) - set(pinned))
    unused = sorted(set(pinned) - set(resolved))
    moved = sorted(k for k in set(resolved) & set(pinned) if resolved[k] != pinned[k])
    today = datetime.date.today().isoformat()
    print(f"{today}: Python {version}, pip resolved {len(resolved)} packages for "
          f"-e .[{EXTRAS}] under {args.constraints.name}")
    for name in unpinned:
        print(f"  resolved but not pinned: {name}=={resolved[name]}")
    for name in unused:
        print(f"  pinned but not installed: {name}=={pinned[name]}")
    for name in moved:
        print(f"  {name}: pinned {pinned[name]}, resolved {resolved[name]}")
    ok = not (unpinned or unused or moved)
    print("the resolution equals the file's pins" if ok else "the file and the resolution differ")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
