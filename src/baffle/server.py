"""Server: the global model, a stock ``torch.optim`` optimizer, EMA and checkpointable state.

Each FedSGD round the server writes the rebuilt gradient g to ``p.grad``, optionally
rescales it so that max|g| <= clip, and calls ``optimizer.step()``. In epoch-level rounds
it loads the example-weighted average of the clients' (replayed) models instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from baffle.ema import EMA
from baffle.errors import ConfigError
from baffle.estimator import trainable_params
from baffle.guide import GuideState
from baffle.reconstruct import rescale_inf_norm, write_grads

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def _adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float],
          momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _adamw(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float],
           momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def _sgd(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float],
         momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS: dict[str, OptimizerFactory] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}


def make_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.99),
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """A stock torch optimizer by registry name (adam, adamw, sgd)."""
    return _registered(name)(params, lr, tuple(betas), momentum, weight_decay)


def _registered(name: str) -> OptimizerFactory:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def optimizer_factory(name: str, params: Iterable[nn.Parameter], *args: Any
                      ) -> Callable[[], torch.optim.Optimizer]:
    """``make_optimizer(name, params, *args)`` deferred: the name is checked now (the same
    one-line error), the optimizer built on call."""
    _registered(name)
    return functools.partial(make_optimizer, name, list(params), *args)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def step_with_gradient(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grads: Sequence[torch.Tensor],
    clip: float | None,
) -> None:
    """p.grad <- rescale(g); optimizer.step(). Shared by the server and local client steps."""
    write_grads(trainable_params(model).values(), rescale_inf_norm(grads, clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Server:
    """Global training state; everything in it is saved in a checkpoint."""

    model: nn.Module
    new_optimizer: Callable[[], torch.optim.Optimizer]  # see ``optimizer``
    ema: EMA | None = None
    # client -> its local optimizer's state after its last local epoch (--client-optimizer
    # keep): BAFFLE's as the server replayed it, bp-fedavg's as the client left it; else empty
    client_optim: dict[int, dict[str, Any]] = field(default_factory=dict)
    guide: GuideState | None = None  # --guide-dims: the gradients that pick the basis

    @functools.cached_property
    def optimizer(self) -> torch.optim.Optimizer:
        """The stock optimizer over the model's trainable parameters, built on first use: a
        Flower client node holds a Server only for the weights it is sent and never steps
        it, and the first ``torch.optim`` constructor of a process imports
        ``torch._dynamo`` (about a second, paid by every ClientApp process)."""
        return self.new_optimizer()

    @property
    def shapes(self) -> list[torch.Size]:
        return [p.shape for p in trainable_params(self.model).values()]

    @property
    def sizes(self) -> list[int]:
        """Entries per trainable tensor: the row blocks of a ``--guide-dims`` basis."""
        return [p.numel() for p in trainable_params(self.model).values()]

    def apply_gradient(self, grads: Sequence[torch.Tensor], clip: float | None) -> None:
        step_with_gradient(self.model, self.optimizer, grads, clip)

    @torch.no_grad()
    def load_average(self, models: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> None:
        """W <- sum_c w_c W_c over the trainable parameters (FedAvg)."""
        for i, p in enumerate(trainable_params(self.model).values()):
            p.copy_(sum(w * m[i] for w, m in zip(weights, models)))

    def eval_model(self) -> nn.Module:
        """The model to evaluate: a copy holding the EMA weights, or the model itself."""
        if self.ema is None:
            return self.model
        import copy

        shadow = copy.deepcopy(self.model)
        shadow.load_state_dict(self.ema.shadow, strict=False)
        return shadow

    def state_dict(self) -> dict[str, object]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "client_optim": self.client_optim,
            **({} if self.guide is None else {"guide": self.guide.state_dict()}),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.model.load_state_dict(state["model"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.client_optim = dict(state.get("client_optim") or {})  # type: ignore[call-overload]
        if self.guide is not None:
            self.guide = GuideState.from_state(state.get("guide"))  # type: ignore[arg-type]
        ema, device = state["ema"], next(self.model.parameters()).device
        self.ema = None if ema is None else EMA.from_state(ema, device)  # type: ignore[arg-type]
