"""Server-guided directions (``--guide-dims r``): the server's own gradients pick the span.

An assumption the paper does not make: the server holds labelled images no client holds
(the first ``--guide-images`` of the validation split). Each round r, before the clients
run, it takes one backprop gradient on a seeded batch of them at the round's weights,

    h_r = grad L(W_r; public batch r)        (batch: clients x batch_size images, at most)

and keeps the last H = ``--guide-history``. Every ``--guide-refresh`` rounds, once it holds
r of them, it sends a new basis: the top r principal directions of those H gradients,

    U = orth(M^T V_top),   M M^T = V diag(lambda) V^T,   M = [h_{r-H+1}; ...; h_r]  (H x d)

(through the small H x H Gram matrix). From then on every direction is U z_k
(``DirectionScheme.basis``), so the clients' forward estimate tends to U (1/K sum z z^T)
U^T g: the gradient's part in the span, with error ~ r/K instead of d/K. Before the first
basis the directions move every weight, as in the paper. Each client downloads U (4 d r
bytes) whenever it lacks the latest one; uploads stay K scalars.

BENCHMARKS.md (section subspace) is where this was found: in a sigma -> 0 proxy, r = 50,
H = 100, 5,000 images and Adam lr 4e-2 reached 95.2% at epoch 9 of 10 with three seeds.
The validation metrics of such a run are measured partly on the server's training images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from baffle.directions import Basis, derive_seed
from baffle.estimator import LossFn, trainable_params


def history_basis(history: torch.Tensor, dims: int) -> torch.Tensor:
    """U (d x dims, orthonormal columns): the top ``dims`` eigenvectors of M^T M for the
    rows M (H x d) of ``history``, as orth(M^T V_top) from M M^T = V L V^T (float64)."""
    rows = history.to(torch.float64)
    _, vectors = torch.linalg.eigh(rows @ rows.T)  # ascending eigenvalues
    return torch.linalg.qr(rows.T @ vectors[:, -dims:]).Q.to(torch.float32)


def public_batch(seed: int, round_: int, pool: int, size: int) -> np.ndarray:
    """Indices (into the server's ``pool`` images) of round ``round_``'s batch: ``size``
    of them (at most the pool) without replacement, a pure function of (seed, round)."""
    rng = np.random.default_rng(derive_seed(seed, "guide", round_))
    return rng.choice(pool, size=min(pool, size), replace=False)


def flat_gradient(model: nn.Module, loss_fn: LossFn, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """grad L(W; x, y) over the trainable parameters, flattened (d,); ``model`` unchanged
    (its .grad fields are left as they were)."""
    params = list(trainable_params(model).values())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return torch.cat([g.detach().reshape(-1) for g in grads]).cpu()


@dataclass
class GuideState:
    """What the server keeps between rounds: the last gradients (rows) and the basis it
    last sent, and which basis each client holds (to count the downloads)."""

    history: list[torch.Tensor] = field(default_factory=list)
    basis: torch.Tensor | None = None  # U (d x r)
    held: dict[int, str] = field(default_factory=dict)  # client -> digest of its basis

    def observe(self, gradient: torch.Tensor, round_: int, dims: int, keep: int,
                refresh: int) -> bool:
        """Append round ``round_``'s gradient (keeping the last ``keep``); on a refresh
        round with at least ``dims`` rows, recompute the basis. True if it did."""
        self.history = [*self.history, gradient][-keep:]
        if len(self.history) >= dims and round_ % refresh == 0:
            self.basis = history_basis(torch.stack(self.history), dims)
            return True
        return False

    def basis_for(self, sizes: Sequence[int]) -> Basis | None:
        return None if self.basis is None else Basis(self.basis, sizes)

    def state_dict(self) -> dict[str, Any]:
        return {"history": torch.stack(self.history) if self.history else None,
                "basis": self.basis, "held": dict(self.held)}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> GuideState:
        if not state:
            return cls()
        rows = state.get("history")
        return cls([] if rows is None else list(rows.unbind(0)), state.get("basis"),
                   {int(c): str(d) for c, d in (state.get("held") or {}).items()})
