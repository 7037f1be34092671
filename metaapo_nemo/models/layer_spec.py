"""Layer implementation choice: megatron's local spec (CPU, plain PyTorch) or the
Transformer Engine spec (Hopper GPUs, optional FP8).

`select_impl` is pure Python (testable without a GPU); `layer_spec` imports megatron's spec
builders; `fp8_kwargs` gives the TransformerConfig fields of the FP8 recipe.

FP8 (TE only): format "hybrid" = E4M3 forward / E5M2 backward (the usual training choice)
or "e4m3"; recipe "delayed" (amax history, the classic TE recipe) or "tensorwise" (current
scaling per tensor). bf16 stays the default; FP8 needs `model.dtype=bfloat16`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec


@dataclass(frozen=True)
class SpecChoice:
    impl: str  # "local" | "transformer_engine"
    fp8: str | None = None  # None | "hybrid" | "e4m3"
    fp8_recipe: str = "delayed"  # "delayed" | "tensorwise"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"


def te_available() -> bool:
    return find_spec("transformer_engine") is not None


def select_impl(
    requested: str,
    fp8: str | None,
    dtype: str,
    cuda: bool,
    te: bool,
    fp8_recipe: str = "delayed",
    fp8_amax_history_len: int = 1024,
    fp8_amax_compute_algo: str = "max",
) -> SpecChoice:
    """Resolves `model.transformer_impl` (auto | local | transformer_engine) and FP8 settings.

    Raises:
        ValueError: naming the key and the fix when the request cannot run here.
    """
    if requested not in ("auto", "local", "transformer_engine"):
        raise ValueError(f"model.transformer_impl={requested!r}; choose auto, local or transformer_engine")
    impl = requested
    if requested == "auto":
        impl = "transformer_engine" if (cuda and te) else "local"
    if impl == "transformer_engine" and not (cuda and te):
        missing = " and ".join(x for x, ok in (("CUDA", cuda), ("transformer_engine", te)) if not ok)
        raise ValueError(
            f"model.transformer_impl=transformer_engine needs {missing}, which this machine lacks; "
            "use model.transformer_impl=local (or auto) here, and the TE spec in the GPU container"
        )
    if fp8 is not None:
        if fp8 not in ("hybrid", "e4m3"):
            raise ValueError(f"model.fp8={fp8!r}; choose null, hybrid (E4M3 fwd / E5M2 bwd) or e4m3")
        if impl != "transformer_engine":
            raise ValueError(
                f"model.fp8={fp8} needs the Transformer Engine spec (model.transformer_impl="
                f"transformer_engine on a Hopper GPU); got the {impl} spec. Set model.fp8=null"
            )
        if dtype != "bfloat16":
            raise ValueError(f"model.fp8={fp8} trains with bf16 master weights; set model.dtype=bfloat16")
        if fp8_recipe not in ("delayed", "tensorwise"):
            raise ValueError(f"model.fp8_recipe={fp8_recipe!r}; choose delayed or tensorwise (current scaling)")
    return SpecChoice(impl, fp8, fp8_recipe, fp8_amax_history_len, fp8_amax_compute_algo)


def fp8_kwargs(choice: SpecChoice) -> dict:
    """TransformerConfig fields of the FP8 recipe ({} when FP8 is off)."""
    if choice.fp8 is None:
        return {}
    out = {"fp8": choice.fp8, "fp8_recipe": choice.fp8_recipe}
    if choice.fp8_recipe == "delayed":
        out |= {"fp8_amax_history_len": choice.fp8_amax_history_len,
                "fp8_amax_compute_algo": choice.fp8_amax_compute_algo}
    return out


def layer_spec(choice: SpecChoice, qk_layernorm: bool = False, num_experts: int = 0):
    """megatron's ModuleSpec for one transformer layer of the chosen implementation
    (``qk_layernorm``: per-head norms on queries and keys, Qwen3; ``num_experts``: an MoE MLP,
    with TE's grouped GEMM on the TE spec and one MLP per local expert on the local spec)."""
    experts = num_experts or None
    if choice.impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(num_experts=experts, moe_grouped_gemm=experts is not None,
                                                          qk_layernorm=qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=experts, normalization="RMSNorm", qk_layernorm=qk_layernorm)
    return _replace_module(spec, _torch_norm_class(), TorchNorm)


class TorchNorm:
    """The local spec's norm: megatron's `WrappedTorchNorm` (a plain ``torch.nn.RMSNorm`` /
    ``LayerNorm``, the same module and numbers) that also runs under sequence parallelism.

    megatron's wrapper refuses ``sequence_parallel``; what sequence parallelism needs of a norm
    is only that its weight's gradient, computed on this rank's sequence shard, is summed over
    the TP group: the weight is marked ``sequence_parallel`` and megatron's
    ``finalize_model_grads`` all-reduces it (as it does for Transformer Engine's norms).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        import torch

        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds or config.layernorm_zero_centered_gamma:
            raise ValueError(f"the local spec's norm supports {sorted(kinds)} without zero-centred gamma; "
                             f"got normalization={config.normalization!r}")
        norm = kinds[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _torch_norm_class():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def _replace_module(spec, old, new):
    """The ModuleSpec tree with every reference to the class ``old`` replaced by ``new``."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if spec is old:
        return new
    if isinstance(spec, ModuleSpec):
        if spec.submodules is not None:
            _replace_fields(spec.submodules, old, new)
        return spec
    return spec


def _replace_fields(submodules, old, new) -> None:
    import dataclasses

    fields = (f.name for f in dataclasses.fields(submodules)) if dataclasses.is_dataclass(submodules) else ()
    for name in fields:
        value = getattr(submodules, name)
        replaced = _replace_module(value, old, new)
        if replaced is not value:
            setattr(submodules, name, replaced)
