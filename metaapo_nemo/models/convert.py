"""HF <-> Megatron-Core weight conversion, TP- and PP-aware, driven by each family's mapping
(`metaapo_nemo.models.families`: Llama, Qwen2, Mistral).

Layout facts (megatron-core local and TE specs alike):
- `linear_qkv` fuses Q, K, V PER QUERY GROUP: for each KV head g, rows are
  [q heads of group g (nq/nkv * hd) | k_g (hd) | v_g (hd)]. TP splits whole groups.
- `linear_fc1` fuses [gate; up]; under TP each rank holds [gate_r; up_r].
- `linear_proj` (o_proj) and `linear_fc2` (down_proj) are row-parallel: split on dim 1.
- Embedding / output layer are vocab-parallel: padded to a multiple of TP, split on dim 0.
- Each TransformerLayer carries its global 1-based `layer_number`, so PP / VPP chunks map
  to HF layer indices without re-deriving megatron's offset rules.

Loading reads only the tensors a rank needs (safetensors `safe_open`). Export streams HF
tensors one at a time (`iter_hf_tensors`): TP all-gather inside the owning stage, then a
broadcast over the pipeline group, so every rank of a model replica sees every tensor;
the same stream feeds the HF writer and (rollout issue) the vLLM weight push.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from metaapo_nemo.models.arch import ModelArch
from metaapo_nemo.models.families import family_of
from metaapo_nemo.models.lora import MARKER, merged_weight
from metaapo_nemo.models.megatron_model import padded_vocab_size
from metaapo_nemo.parallel.state import ParallelContext

# ----------------------------------------------------------------- pure tensor transforms


def _fuse_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, per: int, hd: int) -> torch.Tensor:
    """[q of group g | k_g | v_g] for each of `groups` consecutive query groups."""
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per * hd, *tail), k.reshape(groups, hd, *tail),
                       v.reshape(groups, hd, *tail)], dim=1)
    return fused.reshape(-1, *tail)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch, tp: int, rank: int) -> torch.Tensor:
    """HF q/k/v (weights [out, H] or biases [out]) -> this TP rank's fused linear_qkv slice."""
    hd, per, g = arch.head_dim, arch.num_attention_heads // arch.num_kv_heads, arch.num_kv_heads // tp
    q = q[rank * g * per * hd:(rank + 1) * g * per * hd]
    k, v = k[rank * g * hd:(rank + 1) * g * hd], v[rank * g * hd:(rank + 1) * g * hd]
    return _fuse_groups(q, k, v, g, per, hd)


def split_qkv(fused_full: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv` over the concatenation of all TP slices (dim 0)."""
    nkv, hd = arch.num_kv_heads, arch.head_dim
    per = arch.num_attention_heads // nkv
    tail = fused_full.shape[1:]
    g = fused_full.reshape(nkv, (per + 2) * hd, *tail)
    q, k, v = g.split([per * hd, hd, hd], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)


def split_gate_up(shards: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """TP shards of linear_fc1 ([gate_r; up_r] each) -> full gate, full up."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])


def pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    if weight.shape[0] == padded:
        return weight
    pad = weight.new_zeros(padded - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad], dim=0)


# ----------------------------------------------------------------- name mapping

# The names and split kinds of each family: metaapo_nemo/models/families/ (one file each).


def _layer_numbers(chunk: torch.nn.Module) -> dict[int, int]:
    """Local layer index -> global 0-based layer index, from megatron's layer_number."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}


def _mapped(mapping: dict, name: str, family) -> tuple[str, tuple[str, ...]]:
    if name not in mapping:
        raise ValueError(f"Megatron parameter {name!r} has no HF name in the {family.model_type} family's mapping "
                         f"(metaapo_nemo/models/families/{family.model_type}.py); mapped: {sorted(mapping)}")
    return mapping[name]


def _expert_parallel() -> tuple[int, int]:
    """(expert-parallel size, this rank's index in it); (1, 0) without megatron's state."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 0
    return ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()


def megatron_param_sources(chunk: torch.nn.Module, arch: ModelArch) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """Yields (megatron_name, kind, hf_names) for every parameter of one model chunk."""
    numbers = _layer_numbers(chunk)
    family = family_of(arch.model_type)
    ep, ep_rank = _expert_parallel() if arch.num_experts else (1, 0)
    for name, _ in chunk.named_parameters():
        if MARKER in name:  # a LoRA adapter: not a tensor of the HF base (models/lora.py)
            continue
        if name.startswith("decoder.layers."):
            local, suffix = name[len("decoder.layers."):].split(".", 1)
            expert = family.expert_sources(suffix, arch.num_experts // ep, ep_rank) if arch.num_experts else None
            kind, hf = expert if expert is not None else _mapped(family.layer, suffix, family)
            prefix = f"model.layers.{numbers[int(local)]}."
            yield name, kind, tuple(prefix + h for h in hf)
        else:
            kind, hf = _mapped(family.globals, name, family)
            if name == "output_layer.weight" and arch.tie_word_embeddings:
                hf = ("model.embed_tokens.weight",)  # tied: the last stage holds a copy
            yield name, kind, hf


# ----------------------------------------------------------------- HF -> Megatron


class _SafetensorsReader:
    """Reads individual tensors from a (possibly sharded) safetensors checkpoint."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(self.path / "model.safetensors", "pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {self.path}: "
                "save the checkpoint with save_pretrained(safe_serialization=True)"
            )
        self._open = safe_open
        self._handles: dict[str, object] = {}

    def _handle(self, name: str):
        if name not in self.where:
            raise KeyError(f"tensor '{name}' missing from the checkpoint at {self.path}")
        file = self.where[name]
        if file not in self._handles:
            self._handles[file] = self._open(self.path / file, "pt")
        return self._handles[file]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)  # type: ignore[attr-defined]

    def get_rows(self, name: str, start: int, stop: int, dim: int = 0) -> torch.Tensor:
        """Reads only [start, stop) along `dim` (0 or 1) from disk."""
        sl = self._handle(name).get_slice(name)  # type: ignore[attr-defined]
        return sl[start:stop] if dim == 0 else sl[:, start:stop]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())  # type: ignore[attr-defined]


def _read_rank_slice(kind: str, names: tuple[str, ...], r: _SafetensorsReader, arch: ModelArch,
                     tp: int, rank: int) -> torch.Tensor:
    """This TP rank's Megatron tensor, reading only its slice of each HF tensor from disk."""
    if kind == "replicated":
        return r.get(names[0])
    if kind == "row":
        cols = r.shape(names[0])[1] // tp
        return r.get_rows(names[0], rank * cols, (rank + 1) * cols, dim=1)
    if kind == "gate_up":
        rows = r.shape(names[0])[0] // tp
        return torch.cat([r.get_rows(n, rank * rows, (rank + 1) * rows) for n in names])
    if kind == "qkv":
        hd, per, g = arch.head_dim, arch.num_attention_heads // arch.num_kv_heads, arch.num_kv_heads // tp
        q = r.get_rows(names[0], rank * g * per * hd, (rank + 1) * g * per * hd)
        k, v = (r.get_rows(n, rank * g * hd, (rank + 1) * g * hd) for n in names[1:])
        return _fuse_groups(q, k, v, g, per, hd)
    if kind == "vocab":
        per = padded_vocab_size(arch.vocab_size, tp) // tp
        start, stop = rank * per, min((rank + 1) * per, arch.vocab_size)
        real = r.get_rows(names[0], start, stop) if stop > start else None
        hidden = arch.hidden_size
        out = torch.zeros(per, hidden, dtype=real.dtype if real is not None else torch.float32)
        if real is not None:
            out[: real.shape[0]] = real
        return out
    raise AssertionError(kind)


@torch.no_grad()
def load_hf_weights(chunks: list[torch.nn.Module], hf_dir: str | Path, arch: ModelArch, ctx: ParallelContext) -> None:
    """Copies an HF checkpoint into this rank's Megatron chunks (reads only what it needs)."""
    reader = _SafetensorsReader(hf_dir)
    tp, rank = ctx.dims.tp, ctx.tp_rank
    for chunk in chunks:
        params = dict(chunk.named_parameters())
        for name, kind, hf_names in megatron_param_sources(chunk, arch):
            value = _read_rank_slice(kind, hf_names, reader, arch, tp, rank)
            target = params[name]
            if value.shape != target.shape:
                raise ValueError(
                    f"shape mismatch loading {hf_names} into {name}: checkpoint gives "
                    f"{tuple(value.shape)}, model expects {tuple(target.shape)} (tp={tp})"
                )
            target.copy_(value.to(target.dtype))


# ----------------------------------------------------------------- Megatron -> HF


def _hf_order(arch: ModelArch) -> list[str]:
    """Canonical HF tensor order: embeddings, layer by layer, final norm, lm_head."""
    names = ["model.embed_tokens.weight"]
    family = family_of(arch.model_type)
    experts = [h.replace("{e}", str(e)) for e in range(arch.num_experts) for _, hf in family.experts.values()
               for h in hf]
    for i in range(arch.num_layers):
        for _, hf in family.layer.values():
            if hf[0].endswith("bias") and not arch.qkv_bias:
                continue
            names.extend(f"model.layers.{i}.{h}" for h in hf)
        names.extend(f"model.layers.{i}.{h}" for h in experts)
    names.append("model.norm.weight")
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    return list(dict.fromkeys(names))  # local and TE names map to the same norms


def _gather_tp(shard: torch.Tensor, ctx: ParallelContext) -> list[torch.Tensor]:
    if ctx.dims.tp == 1:
        return [shard]
    parts = [torch.empty_like(shard) for _ in range(ctx.dims.tp)]
    dist.all_gather(parts, shard.contiguous(), group=ctx.tp_group)
    return parts


def _from_megatron(kind: str, parts: list[torch.Tensor], arch: ModelArch) -> list[torch.Tensor]:
    if kind == "replicated":
        return [parts[0]]
    if kind == "qkv":
        return list(split_qkv(torch.cat(parts, dim=0), arch))
    if kind == "gate_up":
        return list(split_gate_up(parts))
    if kind == "row":
        return [torch.cat(parts, dim=1)]
    if kind == "vocab":
        return [torch.cat(parts, dim=0)[: arch.vocab_size]]
    raise AssertionError(kind)


Owner = tuple[int, int, int, str, str, int]  # pp rank, ep rank (-1: every one), chunk, mname, kind, j


def _owners(chunks: list[torch.nn.Module], arch: ModelArch, ctx: ParallelContext) -> dict[str, Owner]:
    """HF name -> (pp_rank, ep_rank, chunk index, megatron name, kind, position in the fused
    group); ep_rank is -1 except for experts, which live on one expert-parallel rank."""
    ep, ep_rank = _expert_parallel() if arch.num_experts else (1, 0)
    local: dict[str, Owner] = {}
    for c, chunk in enumerate(chunks):
        for mname, kind, hf_names in megatron_param_sources(chunk, arch):
            if mname == "output_layer.weight" and arch.tie_word_embeddings:
                continue
            owner_ep = ep_rank if ep > 1 and ".mlp.experts." in hf_names[0] else -1
            for j, h in enumerate(hf_names):
                local[h] = (ctx.pp_rank, owner_ep, c, mname, kind, j)
    for size, group in ((ep, _expert_group() if ep > 1 else None), (ctx.dims.pp, ctx.pp_group)):
        if size > 1:
            gathered: list[dict] = [{} for _ in range(size)]
            dist.all_gather_object(gathered, local, group=group)
            local = {k: v for part in gathered for k, v in part.items()}
    return local


def _expert_group():
    from megatron.core import parallel_state as ps

    return ps.get_expert_model_parallel_group()


@torch.no_grad()
def iter_hf_tensors(
    chunks: list[torch.nn.Module], arch: ModelArch, ctx: ParallelContext, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Streams full HF-named tensors from the sharded model; call on EVERY rank.

    Each tensor is assembled on its owning pipeline stage (TP all-gather), an expert's from
    its expert-parallel rank to the stage's others, and broadcast over the pipeline group, one
    tensor at a time, so peak extra memory is one full tensor (plus one fused group). All
    ranks receive every tensor.
    """
    owners = _owners(chunks, arch, ctx)
    pp_ranks = dist.get_process_group_ranks(ctx.pp_group) if ctx.dims.pp > 1 else [ctx.rank]
    ep, my_ep = _expert_parallel() if arch.num_experts else (1, 0)
    ep_ranks = dist.get_process_group_ranks(_expert_group()) if ep > 1 else [ctx.rank]
    family = family_of(arch.model_type)
    cache: dict[str, list[torch.Tensor]] = {}
    for name in _hf_order(arch):
        pp_rank, owner_ep, c, mname, kind, j = owners[name]
        if pp_rank == ctx.pp_rank and owner_ep in (-1, my_ep):
            if (c, mname) not in cache:
                shard = merged_weight(chunks[c], mname, dict(chunks[c].named_parameters())[mname].detach())
                cache.clear()
                cache[(c, mname)] = _from_megatron(kind, _gather_tp(shard, ctx), arch)  # type: ignore[index]
            tensor = cache[(c, mname)][j]  # type: ignore[index]
        else:
            ref_dtype = next(chunks[0].parameters()).dtype
            tensor = torch.empty(family.hf_shape(name, arch), dtype=ref_dtype, device=ctx.device)
        if owner_ep >= 0:  # an expert: from its expert-parallel rank to the others of each stage
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=ep_ranks[owner_ep], group=_expert_group())
        if ctx.dims.pp > 1:
            tensor = tensor.contiguous()
            dist.broadcast(tensor, src=pp_ranks[pp_rank], group=ctx.pp_group)
        yield name, tensor if dtype is None else tensor.to(dtype)


def export_hf(
    chunks: list[torch.nn.Module],
    arch: ModelArch,
    ctx: ParallelContext,
    src_dir: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    on_tensor: Callable[[str, torch.Tensor], None] | None = None,
) -> Path | None:
    """Writes the model as an HF checkpoint (config, tokenizer copied from `src_dir`).

    Every rank must call it (collectives); rank 0 writes. The directory is written to a
    temporary sibling and renamed, so a crash never leaves a half-written checkpoint.
    """
    import shutil

    from safetensors.torch import save_file

    state = {}
    for name, tensor in iter_hf_tensors(chunks, arch, ctx, dtype):
        if on_tensor is not None:
            on_tensor(name, tensor)
        if ctx.is_main:
            state[name] = tensor.detach().to("cpu").clone()
    if not ctx.is_main:
        return None
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    for item in Path(src_dir).iterdir():
        if item.suffix == ".safetensors" or item.name == "model.safetensors.index.json":
            continue
        if item.is_file():
            shutil.copy2(item, tmp / item.name)
    if dtype is not None:
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
