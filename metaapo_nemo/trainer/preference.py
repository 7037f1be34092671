"""Offline preference step: reference log-probs, the policy loss callback, step metrics.

Legend: N rows (row 2i chosen, 2i+1 rejected of pair i), B pairs, T positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from metaapo_nemo.losses import PairLogps, PreferenceLoss
from metaapo_nemo.models.policy import LossFn, MegatronLM, MicroBatch

# Per-micro-batch sums reduced into step metrics (order fixed: it is a wire format).
STAT_KEYS = (
    "loss",
    "pairs",
    "reward_correct",
    "margin_sum",
    "chosen_reward_sum",
    "rejected_reward_sum",
    "chosen_logps_sum",
    "rejected_logps_sum",
    "response_tokens",
    "logratio_sum",
)


def _seq_logps(mb: MicroBatch, logps_NT: torch.Tensor) -> torch.Tensor:
    return mb.sequence_logps(logps_NT)


def reference_loss_fn(mb: MicroBatch, logps_NT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward-only callback: returns each row's summed response log-prob."""
    return torch.zeros((), device=logps_NT.device), {"seq_logps_N": _seq_logps(mb, logps_NT).detach()}


class ReferenceCache:
    """Reference sequence log-probs of the offline pairs, keyed by pair index.

    It lives with the data for the whole run (not per step): a pair's reference values
    are computed once per reference version, by a per-step fill, a once-per-pass
    precompute, or MetaAPO's round-start margin pass (`rounds.offline_margins`), and
    reused by every later step and epoch. `invalidate()` drops everything when the
    reference changes (MetaAPO's per-round reference); `version` counts those changes.

    Every pipeline stage records WHICH pairs are cached (values exist on the last stage
    only), so all stages agree on `missing()` and run the same reference micro-batches.
    """

    def __init__(self) -> None:
        self._store: dict[int, tuple[float, float] | None] = {}
        self.version = 0

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, pair_index: int) -> bool:
        return pair_index in self._store

    def invalidate(self) -> None:
        """The reference changed: forget every value and bump `version`."""
        self._store.clear()
        self.version += 1

    def clear(self) -> None:
        """Alias of `invalidate` (kept for callers of the per-step cache)."""
        self.invalidate()

    def state_dict(self) -> dict:
        return {"store": dict(self._store), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self._store = dict(state["store"])
        self.version = int(state["version"])

    def entries(self, keys: Sequence[int]) -> dict[int, tuple[float, float] | None]:
        """The stored values of `keys` (None off the last stage), e.g. to share them."""
        return {int(k): self._store[int(k)] for k in keys}

    def update(self, entries: dict[int, tuple[float, float] | None]) -> None:
        """Adds values computed elsewhere (another DP rank's share of the same reference)."""
        self._store.update(entries)

    def missing(self, pairs: Sequence) -> list:
        """The pairs (objects with `.index`) whose reference values are not cached."""
        return [p for p in pairs if p.index not in self._store]

    def has_all(self, microbatches: Sequence[MicroBatch]) -> bool:
        return all(int(i) in self._store for mb in microbatches for i in mb.extras["pair_index"])

    def fill(self, reference: MegatronLM, microbatches: Sequence[MicroBatch]) -> None:
        """Runs the frozen reference over micro-batches (last PP stage keeps the values)."""
        outs = reference.run(microbatches, reference_loss_fn, forward_only=True)
        self.store(microbatches, [o["seq_logps_N"] for o in outs])

    def store(self, microbatches: Sequence[MicroBatch], seq_logps: Sequence[torch.Tensor]) -> None:
        """Records reference sequence log-probs [2B] per micro-batch (empty off the last stage)."""
        for k, mb in enumerate(microbatches):
            seq = seq_logps[k].double().cpu() if k < len(seq_logps) else None
            for j, idx in enumerate(mb.extras["pair_index"].tolist()):
                self._store[idx] = None if seq is None else (float(seq[2 * j]), float(seq[2 * j + 1]))

    def attach(self, microbatches: Sequence[MicroBatch], on_last_stage: bool) -> None:
        """Puts `ref_logps_N` into each micro-batch's extras (needed on the last stage only)."""
        if not on_last_stage:
            return
        for mb in microbatches:
            vals = [v for i in mb.extras["pair_index"].tolist() for v in self._value(i)]
            mb.extras["ref_logps_N"] = torch.tensor(vals, dtype=torch.float32, device=mb.input_ids_NT.device)

    def _value(self, idx: int) -> tuple[float, float]:
        value = self._store[idx]
        assert value is not None, f"pair {idx}: reference values live on the last stage only"
        return value


@contextmanager
def reference_on_device(
    reference: MegatronLM, device: torch.device, offload: bool
) -> Iterator[MegatronLM]:
    """Brings an offloaded reference to `device` for the block and back to the CPU after.

    With `offload=False` the reference stays where it is (no moves). Between uses an
    offloaded reference holds no accelerator memory; on a CPU-only machine both moves
    are no-ops, but the same calls run.
    """
    if not offload:
        yield reference
        return
    reference.offload(device)
    try:
        yield reference
    finally:
        reference.offload("cpu")


class FrozenReference:
    """The frozen reference model of a run, with `reference.offload_to_cpu` honoured in ONE
    place: every forward of every method (DPO fills, MetaAPO's margin pass and online rows)
    goes through `run`, which brings an offloaded reference to the device and back.

    It answers the parts of `MegatronLM` that callers use (`run`, `modules`, `arch`,
    `offload`), so checkpoints and the per-round reference copy see the same model.
    """

    def __init__(self, model: MegatronLM, device: torch.device, offload: bool):
        self.model, self.device, self.offloaded = model, device, offload
        self.arch = model.arch
        if offload:
            model.offload("cpu")  # lives on the CPU between uses

    def run(self, microbatches: Sequence[MicroBatch], loss_fn: LossFn, forward_only: bool = True):
        assert forward_only, "the reference is frozen"
        with reference_on_device(self.model, self.device, self.offloaded):
            return self.model.run(microbatches, loss_fn, forward_only=True)

    def modules(self) -> list[torch.nn.Module]:
        return self.model.modules()

    def offload(self, device) -> None:
        self.model.offload(device)


class AdapterReference:
    """The reference of a LoRA run: the policy itself with its adapters off (the base model), or,
    for a moving reference (``metaapo.reference=per_round``), with a frozen copy of its adapters
    swapped in (`models.lora.LoraAdapter.snapshot`, saved with the policy's state). No second
    model is built; it answers what callers use of `FrozenReference` (`run`, `arch`,
    `copy_from`)."""

    def __init__(self, policy: MegatronLM, moving: bool = False):
        from metaapo_nemo.models import lora

        self.policy, self.arch, self.moving = policy, policy.arch, moving
        if moving:  # the first round's reference: the initial adapters (B = 0: the base)
            for adapter in lora.adapters(policy.modules()):
                adapter.snapshot()

    def run(self, microbatches: Sequence[MicroBatch], loss_fn: LossFn, forward_only: bool = True):
        from metaapo_nemo.models import lora

        assert forward_only, "the reference is frozen"
        chunks = self.policy.modules()
        with lora.snapshot_adapters(chunks) if self.moving else lora.adapters_disabled(chunks):
            return self.policy.run(microbatches, loss_fn, forward_only=True)

    def copy_from(self, policy: MegatronLM) -> None:
        """reference <- the policy's current adapters (the per-round reference's update)."""
        from metaapo_nemo.models import lora

        assert self.moving and policy is self.policy
        for adapter in lora.adapters(policy.modules()):
            adapter.snapshot()


def pair_logps(mb: MicroBatch, logps_NT: torch.Tensor) -> PairLogps:
    """Per-pair sums for the loss (ref values from extras when present)."""
    seq_N = _seq_logps(mb, logps_NT)
    lengths_N = mb.sequence_lengths()
    ref_N = mb.extras.get("ref_logps_N")
    return PairLogps(
        policy_chosen_B=seq_N[0::2],
        policy_rejected_B=seq_N[1::2],
        chosen_len_B=lengths_N[0::2],
        rejected_len_B=lengths_N[1::2],
        ref_chosen_B=None if ref_N is None else ref_N[0::2],
        ref_rejected_B=None if ref_N is None else ref_N[1::2],
    )


def takes_kl_estimate(loss: PreferenceLoss) -> bool:
    """KTO-style losses take a reference point z0 ~ KL(pi || pi_ref) per optimiser step."""
    return "kl_estimate" in inspect.signature(loss.__call__).parameters


def kl_estimate_from(metrics: dict[str, float]) -> float:
    """Next step's KTO reference point: the last step's global mean log-ratio, clamped at 0.

    Using the previous step's DP-reduced value (0 at step 1, where pi == pi_ref) keeps the
    loss identical for every micro-batch x grad-accum x DP split of a step; a per-micro-batch
    estimate would not be.
    """
    return max(0.0, metrics.get("logratio", 0.0))


def policy_loss_fn(loss: PreferenceLoss, num_pairs_global: int, kl_estimate: float | None = None) -> LossFn:
    """The last-stage callback: preference loss over the GLOBAL pair count + stat sums."""
    extra = {}
    if takes_kl_estimate(loss):
        extra["kl_estimate"] = torch.tensor(kl_estimate or 0.0)

    def fn(mb: MicroBatch, logps_NT: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps = pair_logps(mb, logps_NT)
        out = loss(logps, num_pairs_global, **extra)
        stats = {
            "loss": out.loss.detach().clone(),
            "pairs": torch.tensor(float(out.per_pair_B.numel())),
            "reward_correct": (out.chosen_reward_B > out.rejected_reward_B).float().sum(),
            "margin_sum": out.margin_B.sum(),
            "chosen_reward_sum": out.chosen_reward_B.sum(),
            "rejected_reward_sum": out.rejected_reward_B.sum(),
            "chosen_logps_sum": logps.policy_chosen_B.detach().sum(),
            "rejected_logps_sum": logps.policy_rejected_B.detach().sum(),
            "response_tokens": mb.loss_mask_NT.sum(),
            "logratio_sum": _logratio_sum(logps),
        }
        return out.loss, {k: v.detach().float().reshape(()) for k, v in stats.items()}

    return fn


def _logratio_sum(logps: PairLogps) -> torch.Tensor:
    if logps.ref_chosen_B is None or logps.ref_rejected_B is None:
        return torch.zeros(())
    return ((logps.policy_chosen_B - logps.ref_chosen_B).sum()
            + (logps.policy_rejected_B - logps.ref_rejected_B).sum()).detach()


def sum_stats(per_mb: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Stacks per-micro-batch stats into one vector of sums in STAT_KEYS order."""
    if not per_mb:
        return torch.zeros(len(STAT_KEYS), dtype=torch.float64)
    return torch.stack([torch.stack([mb[k].double() for k in STAT_KEYS]) for mb in per_mb]).sum(0)


def finalize_stats(total: torch.Tensor) -> dict[str, float]:
    """Global sums -> reported step metrics."""
    s = dict(zip(STAT_KEYS, total.tolist()))
    pairs = max(s["pairs"], 1.0)
    return {
        "loss": s["loss"],
        "reward_accuracy": s["reward_correct"] / pairs,
        "margin": s["margin_sum"] / pairs,
        "chosen_reward": s["chosen_reward_sum"] / pairs,
        "rejected_reward": s["rejected_reward_sum"] / pairs,
        "chosen_logps": s["chosen_logps_sum"] / pairs,
        "rejected_logps": s["rejected_logps_sum"] / pairs,
        "pairs": s["pairs"],
        "response_tokens": s["response_tokens"],
        "logratio": s["logratio_sum"] / (2 * pairs),
    }
