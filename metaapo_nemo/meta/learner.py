"""The MetaAPO meta-learner h_phi and its update (../shared/METAAPO.md).

h_phi: 1 -> 100 (tanh) -> 1 (sigmoid), fp32. Input x_meta = log sigmoid(beta_in * m_off)
(beta_in = 1.0 in the release: NOT the DPO beta), output w in (0, 1).

Objective over a buffer B of DETACHED per-pair values recorded during policy training:
    meta_loss = mean_B[ w * L_off + (1 - w) * L_on ],   w = h_phi(x_meta)
so d meta_loss / d phi = mean_B[(L_off - L_on) * dh/dphi]: w moves toward whichever
source currently has the lower loss. No gradient reaches the policy.

Optimiser: AdamW, lr 5e-3, weight decay 1e-4 on weights only (biases excluded), gradient
norm clipped to 1.0. Under data parallelism the gradient of the GLOBAL buffer mean is
formed exactly (sum of per-rank gradient sums / global pair count, all-reduced), so every
rank holds a bitwise-identical h_phi after every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class MetaSettings:
    hidden: int = 100
    init: str = "release"  # "release": every weight 0.1, biases 0 | "random": torch default init
    lr: float = 5e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    beta_in: float = 1.0
    seed: int = 0


class MetaNet(nn.Module):
    """h_phi: x_meta [B] -> w [B] in (0, 1)."""

    def __init__(self, hidden: int = 100, init: str = "release", seed: int = 0):
        super().__init__()
        self.fc1 = nn.Linear(1, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        if init == "release":
            with torch.no_grad():
                for lin in (self.fc1, self.fc2):
                    lin.weight.fill_(0.1)
                    lin.bias.zero_()
        elif init == "random":
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for lin in (self.fc1, self.fc2):
                    bound = 1.0 / lin.in_features**0.5
                    lin.weight.uniform_(-bound, bound, generator=gen)
                    lin.bias.uniform_(-bound, bound, generator=gen)
        else:
            raise ValueError(f"metaapo.meta_init={init!r}; choose 'release' or 'random'")

    def forward(self, x_B: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.fc1(x_B.float().unsqueeze(-1)))
        return torch.sigmoid(self.fc2(h)).squeeze(-1)


def meta_input(margin_B: torch.Tensor, beta_in: float) -> torch.Tensor:
    """x_meta = log sigmoid(beta_in * m_off), detached, fp32 (the ONE definition)."""
    return torch.nn.functional.logsigmoid(beta_in * margin_B.detach().float())


@dataclass
class MetaBuffer:
    """Detached per-pair values since the last meta step (x_meta, L_off, L_on)."""

    x: list[torch.Tensor] = field(default_factory=list)
    loss_off: list[torch.Tensor] = field(default_factory=list)
    loss_on: list[torch.Tensor] = field(default_factory=list)

    def add(self, x_B: torch.Tensor, loss_off_B: torch.Tensor, loss_on_B: torch.Tensor) -> None:
        if not (x_B.shape == loss_off_B.shape == loss_on_B.shape) or x_B.dim() != 1:
            raise ValueError(
                f"meta buffer needs equal 1-D shapes, got {tuple(x_B.shape)}, "
                f"{tuple(loss_off_B.shape)}, {tuple(loss_on_B.shape)}"
            )
        for store, v in ((self.x, x_B), (self.loss_off, loss_off_B), (self.loss_on, loss_on_B)):
            store.append(v.detach().float().cpu())

    def __len__(self) -> int:
        return sum(v.numel() for v in self.x)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        empty = torch.zeros(0)
        cat = lambda xs: torch.cat(xs) if xs else empty  # noqa: E731
        return cat(self.x), cat(self.loss_off), cat(self.loss_on)

    def mark(self) -> int:
        """A position to `rollback` to (e.g. before a step that may be skipped)."""
        return len(self.x)

    def rollback(self, mark: int) -> None:
        """Drops everything recorded after `mark` (a skipped step's records)."""
        for store in (self.x, self.loss_off, self.loss_on):
            del store[mark:]

    def clear(self) -> None:
        self.x.clear()
        self.loss_off.clear()
        self.loss_on.clear()

    def state_dict(self) -> dict[str, torch.Tensor]:
        x, off, on = self.tensors()
        return {"x": x, "loss_off": off, "loss_on": on}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.clear()
        if state["x"].numel():
            self.add(state["x"], state["loss_off"], state["loss_on"])


class MetaLearner:
    """h_phi + its AdamW optimiser + the buffer; `step()` is one meta update."""

    def __init__(self, settings: MetaSettings, dp_group=None):
        self.settings = settings
        self.net = MetaNet(settings.hidden, settings.init, settings.seed)
        decay = [p for n, p in self.net.named_parameters() if n.endswith("weight")]
        no_decay = [p for n, p in self.net.named_parameters() if n.endswith("bias")]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr, betas=settings.betas, eps=settings.eps,
        )
        self.buffer = MetaBuffer()
        self.dp_group = dp_group
        self.steps = 0

    @torch.no_grad()
    def weights(self, margin_B: torch.Tensor) -> torch.Tensor:
        """w = h_phi(log sigmoid(beta_in * m)), detached, on the margin's device."""
        x = meta_input(margin_B, self.settings.beta_in).cpu()
        return self.net(x).to(margin_B.device)

    def record(self, margin_off_B: torch.Tensor, loss_off_B: torch.Tensor, loss_on_B: torch.Tensor) -> None:
        """Adds detached per-pair values of pairs that have BOTH an offline and online loss."""
        self.buffer.add(meta_input(margin_off_B, self.settings.beta_in), loss_off_B, loss_on_B)

    def _world(self) -> bool:
        return dist.is_initialized() and dist.get_world_size(self.dp_group) > 1

    def step(self) -> dict[str, float]:
        """One meta step on the buffer (global mean over DP ranks), then clears it.

        Returns metrics (meta_loss, buffer size, grad norm); a no-op when every rank's buffer
        is empty.
        """
        x, off, on = self.buffer.tensors()
        count = torch.tensor([float(x.numel())], dtype=torch.float64)
        if self._world():
            dist.all_reduce(count, group=self.dp_group)
        total = int(count.item())
        self.buffer.clear()
        if total == 0:
            return {"meta_loss": float("nan"), "meta_buffer": 0.0}
        self.optimizer.zero_grad(set_to_none=False)
        w = self.net(x)
        loss_sum = (w * off + (1.0 - w) * on).sum()
        loss_sum.backward()
        stats = torch.tensor([loss_sum.item()], dtype=torch.float64)
        grads = [p.grad for p in self.net.parameters()]
        if self._world():
            flat = torch.cat([g.reshape(-1) for g in grads]).double()
            dist.all_reduce(flat, group=self.dp_group)
            dist.all_reduce(stats, group=self.dp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g).float())
                offset += g.numel()
        for g in grads:
            g.div_(total)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.settings.clip_grad)
        self.optimizer.step()
        self.steps += 1
        return {"meta_loss": float(stats.item()) / total, "meta_buffer": float(total),
                "meta_grad_norm": float(grad_norm)}

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "buffer": self.buffer.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.steps = int(state["steps"])
