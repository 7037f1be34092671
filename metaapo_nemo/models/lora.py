"""LoRA adapters on Megatron-Core's tensor-parallel linears (PEFT's LoRA, layout for layout).

Each targeted linear keeps its frozen weight W and gains, per HF projection it computes, a
pair A [r, in], B [out, r] (PEFT's names and shapes), so that its output becomes
``W x + (alpha / r) B A dropout(x)``. Megatron fuses HF projections: ``linear_qkv`` holds q, k and v
interleaved per query group, ``linear_fc1`` holds [gate; up]; the adapter of each targeted
projection has its own A and B; the A are stacked (`_a_cat`) and the B laid out as the fused weight's
rows (`_b_fused`), so an adapter is exactly PEFT's on the HF module, computed in two matmuls.

Tensor parallelism (t ranks), per kind of linear:

- column-parallel (qkv, gate_up): A is replicated, B is split by rows like W. Without sequence
  parallelism the input x is the same on every TP rank: ``h = A x`` goes through megatron's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward), so A's
  gradient sums every rank's B-slice term and stays equal on all ranks. With sequence
  parallelism x arrives as a sequence shard: it is all-gathered (reduce-scatter backward, which
  sums the ranks' partial input gradients) and A's partial gradient is all-reduced by megatron's
  ``finalize_model_grads`` (A is marked ``sequence_parallel``, as the norms are).
- row-parallel (o_proj, down_proj): A is split by columns like W, B is replicated. ``A x`` is a
  partial sum, all-reduced (``reduce_from_tensor_model_parallel_region``), or reduce-scattered
  onto the sequence shards under sequence parallelism (then B is marked ``sequence_parallel``).

The adapters are a submodule ``lora`` of the linear (parameter names ``...linear_qkv.lora.q_proj_A``)
and act through a forward hook (``lora.compute=adapters``) or through the linear's own GEMM on the
merged weight W + s B A (``lora.compute=merged``, `models.lora_merged`), so the base parameter
names, the converter and the checkpoints of the base are unchanged. Everything else is frozen:
only adapter parameters reach megatron's gradient buffers and its (distributed) optimiser.

Init (PEFT's): A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt(5)), B = 0, drawn from a
generator seeded by the run seed and the parameter's HF name, on the FULL tensor, then sliced: the
same adapters in every parallel layout.

The reference of a LoRA run is the same network with its adapters off (`adapters_disabled`), or a
frozen copy of the adapters (`AdapterSnapshot`, ``metaapo.reference=per_round``): no second model.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from metaapo_nemo.models.arch import FUSED_PROJECTIONS, LORA_TARGETS, ModelArch
from metaapo_nemo.models.arch import projection_shapes as shapes_of
from metaapo_nemo.parallel.state import ParallelContext

# HF projection names users target (PEFT's ``target_modules``); "all-linear" = every one of them.
TARGETS = LORA_TARGETS
# megatron linear (suffix inside a layer) -> (kind, its HF projections in fused order, HF module path)
LINEARS = {
    "self_attention.linear_qkv": ("qkv", FUSED_PROJECTIONS[0], "self_attn"),
    "self_attention.linear_proj": ("row", FUSED_PROJECTIONS[1], "self_attn"),
    "mlp.linear_fc1": ("gate_up", FUSED_PROJECTIONS[2], "mlp"),
    "mlp.linear_fc2": ("row", FUSED_PROJECTIONS[3], "mlp"),
}
MARKER = ".lora."  # in every adapter parameter's name


@dataclass(frozen=True)
class LoraSettings:
    """The ``lora`` config section, resolved."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    seed: int = 0
    compute: str = "adapters"  # "merged": W + s B A in one GEMM per linear (models/lora_merged.py)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projection_shapes(arch: ModelArch) -> dict[str, tuple[int, int]]:
    """(in, out) features of each HF projection of `arch` (`models.arch.projection_shapes`)."""
    return shapes_of(arch.hidden_size, arch.num_attention_heads, arch.num_kv_heads, arch.head_dim,
                     arch.intermediate_size)


class LoraAdapter(torch.nn.Module):
    """The adapters of one megatron linear (this rank's shards); see the module docstring."""

    def __init__(self, kind: str, parts: Sequence[str], hf_prefix: str, arch: ModelArch, ctx: ParallelContext,
                 settings: LoraSettings, sequence_parallel: bool, dtype: torch.dtype):
        super().__init__()
        self.kind, self.parts, self.hf_prefix = kind, tuple(parts), hf_prefix
        self.arch, self.tp, self.tp_rank, self.sp = arch, ctx.dims.tp, ctx.tp_rank, sequence_parallel
        self.scale, self.enabled, self.compute = settings.scale, True, settings.compute
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout > 0 else torch.nn.Identity()
        shapes = projection_shapes(arch)
        r = settings.rank
        for part in self.parts:
            fan_in, out = shapes[part]
            gen = torch.Generator().manual_seed(_seed(settings.seed, f"{hf_prefix}.{part}"))
            bound = 1.0 / math.sqrt(fan_in)
            a_full = torch.empty(r, fan_in).uniform_(-bound, bound, generator=gen)
            b_full = torch.zeros(out, r)
            if kind == "row":  # A split by columns (like W), B replicated
                a, b = a_full.chunk(self.tp, dim=1)[self.tp_rank], b_full
                _tp_attrs(a, partition_dim=1)
                if sequence_parallel:
                    b.sequence_parallel = True  # type: ignore[attr-defined]
            else:  # A replicated, B split by rows (like W)
                a, b = a_full, b_full.chunk(self.tp, dim=0)[self.tp_rank]
                _tp_attrs(b, partition_dim=0)
                if sequence_parallel:
                    a.sequence_parallel = True  # type: ignore[attr-defined]
            self.register_parameter(f"{part}_A", torch.nn.Parameter(a.to(dtype).contiguous()))
            self.register_parameter(f"{part}_B", torch.nn.Parameter(b.to(dtype).contiguous()))
            # tensor-parallel attributes survive nn.Parameter only when set on it
            for name, src in ((f"{part}_A", a), (f"{part}_B", b)):
                for attr in ("tensor_model_parallel", "partition_dim", "partition_stride", "sequence_parallel"):
                    if hasattr(src, attr):
                        setattr(getattr(self, name), attr, getattr(src, attr))

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copies the adapters into frozen buffers ``ref_<name>`` (a moving reference's copy; saved
        with the model's state, with the same tensor-parallel axes)."""
        for name, p in self.named_parameters():
            ref = getattr(self, f"ref_{name}", None)
            if ref is None:
                self.register_buffer(f"ref_{name}", p.detach().clone())
                for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
                    if hasattr(p, attr):
                        setattr(getattr(self, f"ref_{name}"), attr, getattr(p, attr))
            else:
                ref.copy_(p.detach())

    def _a(self, part: str) -> torch.Tensor:
        return getattr(self, f"{part}_A")

    def _b(self, part: str) -> torch.Tensor:
        return getattr(self, f"{part}_B")

    def _a_cat(self) -> torch.Tensor:
        """[k r, in_local]: the A of each of the k projections, stacked (one matmul reads x once)."""
        if len(self.parts) == 1:
            return self._a(self.parts[0])
        return torch.cat([self._a(p) for p in self.parts])

    def _b_fused(self) -> torch.Tensor:
        """[out_local, k r]: each projection's B in its rows of the fused linear (megatron's q/k/v
        interleaving per query group, [gate; up]) and its own r columns, zeros elsewhere, so that
        ``B_fused (A_cat x)`` is the fused linear's delta in its own row layout. (The zero blocks
        cost up to k x the B GEMM's flops, small beside the base's at these ranks.)"""
        return self._fuse_b([self._b(p) for p in self.parts])

    def _fuse_b(self, bs: Sequence[torch.Tensor]) -> torch.Tensor:
        """`_b_fused` of the given per-projection tensors ([out_p, c] each, ``self.parts`` order)."""
        if self.kind == "row":
            return bs[0]
        shapes = projection_shapes(self.arch)
        names = LINEARS["self_attention.linear_qkv" if self.kind == "qkv" else "mlp.linear_fc1"][1]
        blocks = []
        for part, b in zip(self.parts, bs):
            rows = {n: b if n == part else b.new_zeros(shapes[n][1] // self.tp, b.shape[1]) for n in names}
            if self.kind == "gate_up":
                blocks.append(torch.cat([rows["gate_proj"], rows["up_proj"]]))
                continue
            # per query group [q_g | k_g | v_g], as convert._fuse_groups (convert imports this module)
            groups, hd = self.arch.num_kv_heads // self.tp, self.arch.head_dim
            q = rows["q_proj"].reshape(groups, -1, b.shape[1])
            k, v = (rows[n].reshape(groups, hd, b.shape[1]) for n in ("k_proj", "v_proj"))
            blocks.append(torch.cat([q, k, v], dim=1).reshape(-1, b.shape[1]))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)

    def part_rows(self) -> list[slice | torch.Tensor]:
        """Per projection, the rows of the fused linear holding its B's rows, in B's order: a slice
        where they are contiguous (a lone projection, gate / up), else an index (q / k / v, which
        megatron interleaves per query group). Read off `_fuse_b` of row numbers, so the two
        layouts cannot disagree."""
        rows = getattr(self, "_part_rows", None)
        if rows is None:
            if self.kind == "row":
                rows = [slice(None)]
            else:
                # row numbers + 1 (0 marks the zero blocks), exact in float64
                codes = self._fuse_b([torch.arange(1, self._b(p).shape[0] + 1, dtype=torch.float64)[:, None]
                                      for p in self.parts])
                rows = []
                for i in range(len(self.parts)):
                    at = codes[:, i].nonzero().squeeze(1)
                    at = at[codes[at, i].argsort()]
                    start = int(at[0])
                    contiguous = bool((at == torch.arange(start, start + len(at))).all())
                    device = self._b(self.parts[i]).device
                    rows.append(slice(start, start + len(at)) if contiguous else at.to(device))
            self._part_rows = rows
        return rows

    def add_delta(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + scale B A dropout(x)``: the linear's output [s, b, out_local] with the adapters'
        addition, for its input x ([s, b, in] as megatron's). One matmul reads x for all of a fused
        linear's projections and one addmm writes their deltas into the output's layout."""
        from megatron.core import tensor_parallel as mp

        x = self.dropout(x)
        if self.kind == "row":
            h = x @ self._a_cat().t()  # partial over the TP ranks' input columns
            if self.tp > 1:
                h = mp.reduce_scatter_to_sequence_parallel_region(h) if self.sp else \
                    mp.reduce_from_tensor_model_parallel_region(h)
        else:
            if self.tp > 1 and self.sp:
                x = mp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True)
            h = x @ self._a_cat().t()
            if self.tp > 1 and not self.sp:
                h = mp.copy_to_tensor_model_parallel_region(h)
        width = out.shape[-1]
        return torch.addmm(out.reshape(-1, width), h.reshape(-1, h.shape[-1]).to(out.dtype),
                           self._b_fused().t().to(out.dtype), alpha=self.scale).view(out.shape)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """scale x B A in the base weight's local (this TP rank's) layout: what merging adds to W."""
        return (self._b_fused() @ self._a_cat()) * self.scale

    def hook(self, module: torch.nn.Module, args: tuple, output):
        if not self.enabled:
            return output
        x = args[0]
        norm_weight = getattr(module, "layer_norm_weight", None)
        if norm_weight is not None:  # Transformer Engine's fused norm + linear: the adapter reads the normed x
            x = torch.nn.functional.rms_norm(x, (x.shape[-1],), norm_weight,
                                             module.config.layernorm_epsilon)  # type: ignore[union-attr]
        out, bias = output
        return self.add_delta(out, x), bias


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def _tp_attrs(t: torch.Tensor, partition_dim: int) -> None:
    t.tensor_model_parallel = True  # type: ignore[attr-defined]
    t.partition_dim = partition_dim  # type: ignore[attr-defined]
    t.partition_stride = 1  # type: ignore[attr-defined]


def _layer_numbers(chunk: torch.nn.Module) -> dict[int, int]:
    """Local layer index -> global 0-based layer index (megatron's layer_number)."""
    return {i: layer.layer_number - 1 for i, layer in enumerate(chunk.decoder.layers)}


def attach_lora(chunks: Sequence[torch.nn.Module], arch: ModelArch, ctx: ParallelContext,
                settings: LoraSettings) -> int:
    """Adds adapters to every targeted linear of the (unwrapped) chunks and freezes the rest.

    Returns:
        The number of adapter parameters on this rank.
    """
    from metaapo_nemo.parallel import compat

    compat.frozen_linear_dgrad_as_one_gemm()  # the frozen base's input gradients: one GEMM each
    if arch.num_experts:
        raise ValueError("LoRA on a mixture-of-experts model is not supported yet (the experts' linears); "
                         "train it with lora: null")
    count = 0
    for chunk in chunks:
        chunk.requires_grad_(False)
        numbers = _layer_numbers(chunk)
        sp = bool(chunk.config.sequence_parallel)
        for name, module in list(chunk.named_modules()):
            if not name.startswith("decoder.layers."):
                continue
            local, _, suffix = name[len("decoder.layers."):].partition(".")
            if suffix not in LINEARS:
                continue
            kind, parts, hf_module = LINEARS[suffix]
            chosen = [p for p in parts if p in settings.targets]
            if not chosen:
                continue
            dtype = module.weight.dtype
            adapter = LoraAdapter(kind, chosen, f"model.layers.{numbers[int(local)]}.{hf_module}", arch, ctx,
                                  settings, sp, dtype).to(module.weight.device)
            module.lora = adapter  # registers the submodule: "....linear_qkv.lora.q_proj_A"
            if settings.compute == "adapters":
                module.register_forward_hook(adapter.hook)
            else:  # "merged": the linear's own GEMM takes W + s B A (models/lora_merged.py)
                if not hasattr(module, "_forward_impl") or hasattr(module, "layer_norm_weight"):
                    raise ValueError(
                        f"lora.compute=merged needs megatron's local linears (a substitute weight at their "
                        f"_forward_impl); {type(module).__name__} is Transformer Engine's: use "
                        "lora.compute=adapters, or model.transformer_impl=local")
                from metaapo_nemo.models import lora_merged

                lora_merged.install(module, adapter)
            _checkpoint_adapters(module, adapter)
            count += sum(p.numel() for p in adapter.parameters())
    return count


def adapters(chunks: Sequence[torch.nn.Module]) -> Iterator[LoraAdapter]:
    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, LoraAdapter):
                yield m


@contextlib.contextmanager
def adapters_disabled(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The base model: every adapter off inside the block (the LoRA run's fixed reference)."""
    mods = list(adapters(chunks))
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


def merged_weights(chunks: Sequence[torch.nn.Module]) -> contextlib.AbstractContextManager:
    """One schedule's scope for ``lora.compute=merged``: each adapted linear merges W + s B A once
    and reuses it for every micro-batch (`models.lora_merged.merged_weights`); a no-op otherwise."""
    mods = [m for m in adapters(chunks) if m.compute == "merged"]
    if not mods:
        return contextlib.nullcontext()
    from metaapo_nemo.models import lora_merged

    return lora_merged.merged_weights(mods)


def adapter_tensors(chunks: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """This rank's adapter parameters, in a fixed order."""
    return [p for m in adapters(chunks) for p in m.parameters()]


@contextlib.contextmanager
def swapped_adapters(chunks: Sequence[torch.nn.Module], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """The adapters temporarily replaced by ``values`` (a frozen snapshot), restored bitwise after."""
    params = adapter_tensors(chunks)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@contextlib.contextmanager
def snapshot_adapters(chunks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """The adapters temporarily replaced by their `LoraAdapter.snapshot` (a per-round reference)."""
    mods = list(adapters(chunks))
    with swapped_adapters(chunks, [getattr(m, f"ref_{n}") for m in mods for n, _ in m.named_parameters()]):
        yield


def merged_weight(chunk: torch.nn.Module, param_name: str, shard: torch.Tensor) -> torch.Tensor:
    """``shard`` (a base weight on this rank) with its adapters merged in, if it has any."""
    module_name, _, leaf = param_name.rpartition(".")
    if leaf != "weight":
        return shard
    module = chunk.get_submodule(module_name)
    adapter = getattr(module, "lora", None)
    if not isinstance(adapter, LoraAdapter) or not adapter.enabled:
        return shard
    return shard + adapter.delta_weight().to(shard.dtype)


def _checkpoint_adapters(module: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Makes the linear's distributed-checkpoint state name the adapters' TP axes (megatron's
    linears treat unknown tensors as replicated, which would keep only TP rank 0's B / A shard)."""
    original = module.sharded_state_dict

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        out = original(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        axes = {name: t.partition_dim for name, t in adapter.state_dict(keep_vars=True).items()
                if getattr(t, "tensor_model_parallel", False)}
        out.update(make_sharded_tensors_for_checkpoint(adapter.state_dict(keep_vars=True), f"{prefix}lora.", axes,
                                                       sharded_offsets))
        return out

    module.sharded_state_dict = sharded_state_dict  # type: ignore[method-assign]
