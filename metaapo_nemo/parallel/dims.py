"""One description of the parallel layout, validated in plain Python.

``ParallelDims`` (after torchtitan) holds the world size and the model-parallel degrees; the
data-parallel degree is derived. ``validate()`` checks the arithmetic that Megatron-Core would
otherwise assert on deep inside ``initialize_model_parallel`` (or, worse, not at all) and
fails with the key, the value, the arithmetic and the values that would work. Nothing here
imports torch or megatron, so ``--dry-run`` works on a login node.

Rank order follows Megatron-Core's default ``tp-cp-ep-dp-pp``: tensor-parallel ranks are the
fastest-varying (adjacent ranks share a node), pipeline stages the slowest. Expert
parallelism subdivides the data-parallel group for MoE layers only, so it does not change
the dense coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

_MAX_RANKS_SHOWN = 16
_MAX_COMBOS_SHOWN = 12


def _divisors(n: int) -> list[int]:
    """Return the positive divisors of ``n`` in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _or_list(values: list[int] | list[str]) -> str:
    """Format ``[1, 2, 4]`` as ``"1, 2 or 4"``."""
    items = [str(v) for v in values]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " or " + items[-1]


@dataclass(frozen=True)
class ParallelDims:
    """World size and parallel degrees; ``dp`` is derived.

    Attributes:
        world_size: Total number of ranks.
        tp: Tensor-parallel size.
        pp: Pipeline-parallel size.
        cp: Context-parallel size.
        vpp: Virtual pipeline stages per pipeline rank (interleaved schedule), or None.
        ep: Expert-parallel size (MoE only; splits the dp x cp group).
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None
    ep: int = 1

    @property
    def model_parallel_size(self) -> int:
        """Ranks holding one model replica: ``tp * pp * cp``."""
        return self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel size: ``world_size // (tp * pp * cp)``."""
        return self.world_size // self.model_parallel_size

    def validate(
        self,
        num_layers: int | None = None,
        num_attention_heads: int | None = None,
        num_kv_heads: int | None = None,
    ) -> None:
        """Check the layout, optionally against the model's shape.

        Args:
            num_layers: Transformer layers; checked against ``pp`` and ``pp * vpp``.
            num_attention_heads: Query heads; must be divisible by ``tp``.
            num_kv_heads: Key/value heads (GQA); must be divisible by ``tp``.

        Raises:
            ValueError: Every problem found, one per line, each with the arithmetic and the
                values that would work.
        """
        errors = self._check_positive()
        if errors:
            raise ValueError("\n".join(errors))
        errors += self._check_heads(num_attention_heads, num_kv_heads)
        errors += self._check_layers(num_layers)
        errors += self._check_world(num_layers, num_attention_heads, num_kv_heads)
        if not errors and (self.dp * self.cp) % self.ep != 0:
            ok = _divisors(self.dp * self.cp)
            errors.append(
                f"ep={self.ep} does not divide data-parallel x context-parallel size "
                f"dp {self.dp} x cp {self.cp} = {self.dp * self.cp}; use ep {_or_list(ok)}"
            )
        if errors:
            raise ValueError("\n".join(errors))

    def _check_positive(self) -> list[str]:
        errors = []
        for name in ("world_size", "tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if value < 1:
                key = name if name in ("world_size", "ep") else f"parallel.{name}"
                errors.append(f"{key}={value} must be >= 1")
        if self.vpp is not None and self.vpp < 1:
            errors.append(f"parallel.vpp={self.vpp} must be >= 1 or null")
        return errors

    def _head_options(self, heads: int, kv_heads: int | None) -> list[int]:
        """tp values that divide the heads and fit the world with this pp and cp."""
        common = math.gcd(heads, kv_heads) if kv_heads else heads
        fit = [d for d in _divisors(common) if self.world_size % (d * self.pp * self.cp) == 0]
        return fit or _divisors(common)

    def _check_heads(self, heads: int | None, kv_heads: int | None) -> list[str]:
        errors = []
        for key, value in (
            ("model.num_attention_heads", heads),
            ("model.num_key_value_heads", kv_heads),
        ):
            if value is not None and value % self.tp != 0:
                options = self._head_options(heads or value, kv_heads)
                errors.append(
                    f"parallel.tp={self.tp} does not divide {key}={value} "
                    f"({value} / {self.tp} = {value / self.tp:g}); use {_or_list(options)}"
                )
        return errors

    def _check_layers(self, num_layers: int | None) -> list[str]:
        errors = []
        if self.vpp is not None and self.pp == 1:
            errors.append(
                f"parallel.vpp={self.vpp} needs parallel.pp > 1 (pp=1): virtual stages "
                "interleave several pipeline ranks; set parallel.vpp=null or parallel.pp >= 2"
            )
        if num_layers is None:
            return errors
        if num_layers % self.pp != 0:
            fit = self.world_size // (self.tp * self.cp) if self.world_size else 0
            options = [d for d in _divisors(num_layers) if fit and fit % d == 0] or [1]
            errors.append(
                f"parallel.pp={self.pp} does not divide model.num_layers={num_layers} "
                f"({num_layers} / {self.pp} = {num_layers / self.pp:g} layers per stage); "
                f"use {_or_list(options)}"
            )
        elif self.vpp is not None and self.pp > 1 and num_layers % (self.pp * self.vpp) != 0:
            per_stage = num_layers // self.pp
            options = [d for d in _divisors(per_stage) if d > 1] or ["null"]
            errors.append(
                f"model.num_layers={num_layers} is not divisible by parallel.pp={self.pp} x "
                f"parallel.vpp={self.vpp} = {self.pp * self.vpp}; use vpp {_or_list(options)}"
            )
        return errors

    def _combos(self, num_layers: int | None, heads: int | None, kv: int | None) -> list[str]:
        """(tp, pp) pairs that fit ``world_size`` with this cp and the model's shape."""
        combos = []
        for tp in _divisors(self.world_size):
            for pp in _divisors(self.world_size // tp):
                if self.world_size % (tp * pp * self.cp) != 0:
                    continue
                if any(v is not None and v % tp for v in (heads, kv)):
                    continue
                if num_layers is not None and num_layers % pp:
                    continue
                combos.append(f"({tp}, {pp})")
        return combos

    def _check_world(self, num_layers: int | None, heads: int | None, kv: int | None) -> list[str]:
        size = self.model_parallel_size
        if self.world_size % size == 0:
            return []
        lo = (self.world_size // size) * size
        sizes = [s for s in (lo, lo + size) if s > 0]
        combos = self._combos(num_layers, heads, kv)
        more = ", ..." if len(combos) > _MAX_COMBOS_SHOWN else ""
        shown = ", ".join(combos[:_MAX_COMBOS_SHOWN]) + more
        return [
            f"world_size={self.world_size} is not divisible by parallel.tp={self.tp} x "
            f"parallel.pp={self.pp} x parallel.cp={self.cp} = {size}; use a world size of "
            f"{_or_list(sizes)}, or (tp, pp) in {shown or '(1, 1)'} with cp={self.cp}"
        ]

    def coords(self, rank: int) -> dict[str, int]:
        """Return the (dp, pp, cp, tp) coordinates of ``rank`` in Megatron's default order.

        Args:
            rank: Global rank in ``[0, world_size)``.

        Returns:
            ``{"dp": ..., "pp": ..., "cp": ..., "tp": ...}`` with tp varying fastest.
        """
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={self.world_size})")
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = (rank // (self.tp * self.cp)) % self.dp
        pp_rank = rank // (self.tp * self.cp * self.dp)
        return {"dp": dp_rank, "pp": pp_rank, "cp": cp_rank, "tp": tp_rank}

    def describe(self) -> str:
        """Return a human-readable multi-line description of the layout.

        For ``world_size <= 16`` every rank's (dp, pp, tp) coordinates are listed (plus cp
        when cp > 1). Call ``validate()`` first; an inconsistent layout is described as is.
        """
        vpp = "null" if self.vpp is None else str(self.vpp)
        lines = [
            f"parallel layout: world_size={self.world_size} = tp {self.tp} x cp {self.cp} "
            f"x pp {self.pp} x dp {self.dp}",
            f"  tp={self.tp} pp={self.pp} vpp={vpp} cp={self.cp} ep={self.ep} dp={self.dp}",
            "  rank order tp-cp-ep-dp-pp (tp fastest, Megatron-Core default)",
        ]
        if self.world_size % self.model_parallel_size != 0:
            lines.append("  (inconsistent: world_size is not a multiple of tp x pp x cp)")
            return "\n".join(lines)
        if self.world_size > _MAX_RANKS_SHOWN:
            lines.append(f"  (rank table omitted for world_size > {_MAX_RANKS_SHOWN})")
            return "\n".join(lines)
        for rank in range(self.world_size):
            c = self.coords(rank)
            cp = f", cp={c['cp']}" if self.cp > 1 else ""
            lines.append(f"  rank {rank:>2} -> (dp={c['dp']}, pp={c['pp']}{cp}, tp={c['tp']})")
        return "\n".join(lines)
