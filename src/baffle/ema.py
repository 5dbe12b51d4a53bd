"""Exponential moving average of weights, as explicit state.

After update t (t = 0, 1, ...), with warm-up d_t = min(decay, (1 + t) / (10 + t)):

    shadow <- d_t * shadow + (1 - d_t) * W

Evaluation uses the shadow weights; training continues on W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class EMA:
    """Shadow copies of a model's floating-point parameters and buffers."""

    decay: float
    shadow: dict[str, torch.Tensor]
    updates: int = 0

    @classmethod
    def of(cls, model: nn.Module, decay: float) -> EMA:
        return cls(decay, {n: t.detach().clone() for n, t in _floats(model)})

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, t in _floats(model):
            self.shadow[n].mul_(d).add_(t.detach(), alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": self.shadow, "updates": self.updates}

    @classmethod
    def from_state(cls, state: dict[str, object], device: torch.device | str | None = None
                   ) -> EMA:
        """An EMA from ``state_dict()``, its shadow moved to ``device`` (checkpoints load
        onto the CPU; the shadow must sit beside the model it follows)."""
        shadow = {n: t.to(device) for n, t in state["shadow"].items()}  # type: ignore[attr-defined]
        updates = int(state["updates"])  # type: ignore[call-overload]
        return cls(float(state["decay"]), shadow, updates)  # type: ignore[arg-type]


def _floats(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [(n, t) for n, t in named if t.is_floating_point()]
