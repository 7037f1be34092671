"""PEFT's side of the LoRA adapters (models/lora.py): their PEFT names, the full-adapter stream
(TP gathered, PP broadcast; the export's and the adapter refit's), the PEFT adapter directory,
and the fingerprint of the frozen base a LoRA checkpoint belongs to."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

from metaapo_nemo.models.arch import LORA_TARGETS, ModelArch
from metaapo_nemo.models.lora import LoraAdapter, LoraSettings, adapters, projection_shapes
from metaapo_nemo.parallel.state import ParallelContext

ADAPTER_DIR = "lora_adapter"  # the PEFT adapter directory inside an exported (merged) HF checkpoint


def peft_name(hf_module: str, part: str, which: str) -> str:
    """PEFT's name of an adapter factor: ``base_model.model.<module>.<part>.lora_<A|B>.weight``."""
    return f"base_model.model.{hf_module}.{part}.lora_{which}.weight"


def which_of(name: str) -> str:
    """"A" or "B": the factor a PEFT adapter name holds."""
    return name.rsplit(".", 2)[1][-1]


def _peft_order(name: str) -> tuple[int, int, str]:
    """Sort key of a PEFT adapter name: layer, projection (`LORA_TARGETS` order), A before B."""
    layer = int(name.split(".layers.", 1)[1].split(".", 1)[0])
    part, which = name.rsplit(".", 3)[1:3]
    return layer, LORA_TARGETS.index(part), which


@torch.no_grad()
def iter_adapter_tensors(chunks: Sequence[torch.nn.Module], arch: ModelArch, ctx: ParallelContext,
                         settings: LoraSettings, dtype: torch.dtype | None = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams every adapter factor, PEFT-named and full (TP shards gathered inside the owning
    pipeline stage, then broadcast over the pipeline group), in layer / projection / A-B order,
    to EVERY rank; call on every rank (the collectives of `convert.iter_hf_tensors`, on adapter
    sizes). A factor that needed no collective is the parameter itself (detached): a consumer
    that changes tensors in place copies them first (vLLM's worker does)."""
    import torch.distributed as dist

    local: dict[str, tuple[LoraAdapter, str, str]] = {}
    for m in adapters(chunks):
        for part in m.parts:
            for which in ("A", "B"):
                local[peft_name(m.hf_prefix, part, which)] = (m, part, which)
    owners = dict.fromkeys(local, ctx.pp_rank)
    if ctx.dims.pp > 1:
        gathered: list[dict] = [{} for _ in range(ctx.dims.pp)]
        dist.all_gather_object(gathered, owners, group=ctx.pp_group)
        owners = {k: v for part in gathered for k, v in part.items()}
    pp_ranks = dist.get_process_group_ranks(ctx.pp_group) if ctx.dims.pp > 1 else [ctx.rank]
    shapes, r = projection_shapes(arch), settings.rank
    like = next(chunks[0].parameters())  # dtype and device of what other stages send
    split = {("row", "A"): 1, ("qkv", "B"): 0, ("gate_up", "B"): 0}  # the factors split over TP, and their dim
    for name in sorted(owners, key=_peft_order):
        if owners[name] == ctx.pp_rank:
            m, part, which = local[name]
            t = getattr(m, f"{part}_{which}").detach()
            dim = split.get((m.kind, which))
            if dim is not None and ctx.dims.tp > 1:  # as convert._gather_tp (convert imports this module)
                pieces = [torch.empty_like(t) for _ in range(ctx.dims.tp)]
                dist.all_gather(pieces, t.contiguous(), group=ctx.tp_group)
                t = torch.cat(pieces, dim=dim)
        else:
            fan_in, out = shapes[name.rsplit(".", 3)[1]]
            t = torch.empty((r, fan_in) if which_of(name) == "A" else (out, r), dtype=like.dtype, device=like.device)
        if ctx.dims.pp > 1:
            t = t.contiguous()
            dist.broadcast(t, src=pp_ranks[owners[name]], group=ctx.pp_group)
        yield name, t if dtype is None else t.to(dtype)


def full_adapters(chunks: Sequence[torch.nn.Module], arch: ModelArch, ctx: ParallelContext,
                  settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Every adapter as PEFT names it, full float32 CPU tensors, on global rank 0 ({} elsewhere).
    Call on EVERY rank."""
    out = {}
    for name, t in iter_adapter_tensors(chunks, arch, ctx, settings):
        if ctx.rank == 0:
            out[name] = t.float().cpu().contiguous()
    return out


def peft_config(settings: LoraSettings, base: str) -> dict:
    """The PEFT ``adapter_config.json`` of adapters trained with `settings` on `base`."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
            "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": list(settings.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
            "modules_to_save": None}


def export_peft(chunks: Sequence[torch.nn.Module], arch: ModelArch, ctx: ParallelContext, settings: LoraSettings,
                base: str, out_dir) -> None:
    """Writes the adapters as a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors)
    that ``PeftModel.from_pretrained(<the HF base>, out_dir)`` loads. Call on EVERY rank; rank 0
    writes (to a temporary sibling, then renamed)."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    tensors = full_adapters(chunks, arch, ctx, settings)
    if ctx.rank != 0:
        return
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(peft_config(settings, base), indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


class BaseFingerprint:
    """The frozen base a LoRA checkpoint belongs to: its path and a fingerprint (sha256 over
    config.json and, per weight file, its size, its header and its first and last MiB), kept in
    trainer.json; a resume or an export against another base is refused (`load_state_dict`)."""

    def __init__(self, model_dir):
        from pathlib import Path

        self.path = str(model_dir)
        self.fingerprint = fingerprint(Path(model_dir))

    def state_dict(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"this LoRA checkpoint's adapters were trained on the base at {state.get('path')} (fingerprint "
                f"{str(state.get('fingerprint'))[:12]}), but model.path is {self.path} (fingerprint "
                f"{self.fingerprint[:12]}): adapters only mean something on their own base; set model.path to "
                "that checkpoint, or start a fresh run (checkpoint.resume=never)")


def fingerprint(model_dir) -> str:
    """sha256 over config.json and each safetensors file's size, header and first and last MiB
    (the bytes that differ between two checkpoints of one architecture, read in milliseconds)."""
    from pathlib import Path

    h = hashlib.sha256()
    root = Path(model_dir)
    h.update((root / "config.json").read_bytes())
    for f in sorted(root.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()

