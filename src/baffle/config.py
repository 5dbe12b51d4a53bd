"""Typed run configuration: one frozen dataclass, parsed and validated in one place.

Sources, later ones winning: the defaults below (the authors' settings), a TOML file,
command-line flags. The resolved config is saved as ``config.json`` in every run
directory and inside every checkpoint, so a run can be repeated exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from baffle.directions import SAMPLERS
from baffle.engines import resolve_budget
from baffle.errors import ConfigError
from baffle.estimator import ENGINES, validate_spec

METHODS = ("baffle", "bp-fedsgd", "bp-fedavg")
MODES = ("fedsgd", "epoch")
SEED_SHARING = ("round", "client")
SPLITS = ("iid", "dirichlet", "shards")
PERTURB = ("all", "layer")
CLIENT_OPTIMIZER = ("fresh", "keep")
EMA_EVERY = ("epoch", "round")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a federated run. Defaults follow the authors' MNIST setting."""

    # what is trained
    method: str = "baffle"  # baffle | bp-fedsgd | bp-fedavg
    mode: str = "fedsgd"  # fedsgd: one server step per round; epoch: one local epoch per round
    dataset: str = "digits"
    data_dir: str = ""  # folder of the data files ("" = the data set's default cache)
    download: bool = False
    model: str = "lenet"
    norm: str = "none"  # group | batch | none
    activation: str = "hardswish"
    # federation
    clients: int = 10
    split: str = "iid"  # iid | dirichlet | shards
    alpha: float = 0.5  # Dirichlet concentration
    shards_per_client: int = 2
    val_per_class: int = -1  # -1: the data set's default hold-out
    participation: float = 1.0  # fraction of clients sampled per round
    clients_per_round: int = 0  # if > 0, sample exactly this many instead
    min_clients: int = 1  # a round with fewer valid uploads leaves the model unchanged
    # estimator
    K: int = 100
    K_milestones: tuple[int, ...] = ()  # epochs at which K changes ...
    K_values: tuple[int, ...] = ()  # ... to these values (a K schedule)
    sigma: float = 1e-4
    scheme: str = "forward"  # forward (K+1 passes) | central (2K passes)
    seed_sharing: str = "round"  # round: one seed for all clients | client: one per client
    perturb: str = "all"  # all: each direction moves every weight | layer: only layer k mod L
    layer_cycle: tuple[int, ...] = ()  # layer: direction k moves layer c[k mod len(c)]
    sampler: str = "torch"  # how directions are drawn: torch generators | counter (GPU)
    engine: str = "auto"  # auto | batched | delta | inplace | sequential | vmap
    chunk: int = 32  # perturbed models per batched pass
    max_memory: str = "auto"  # estimator scratch budget, e.g. 512MiB, 2GiB (auto = 1/4 of free)
    # server-guided directions (baffle.guide): the server's backprop on held-out images
    guide_dims: int = 0  # r > 0: every direction in the top r of its recent gradients
    guide_history: int = 100  # H: gradients (one a round) the basis is computed from
    guide_refresh: int = 10  # rounds between new bases
    guide_images: int = 5000  # the server's labelled images: the first N of the val split
    guide_solve: bool = False  # rebuild c = U^T g by least squares (K > r), not the mean
    # schedule
    epochs: int = 20
    rounds: int = 0  # if > 0, overrides epochs
    batch_size: int = 32
    local_steps: int = 0  # epoch mode: local steps per round (0 = one local epoch)
    client_optimizer: str = "fresh"  # local epochs: a new local optimizer each round, or keep one
    # optimizer (a stock torch.optim class)
    optimizer: str = "adam"
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.99)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    clip: float = 0.3  # rescale the estimate so max|g| <= clip; 0 switches it off
    lr_milestones: tuple[int, ...] = (60,)  # epochs at which lr *= lr_gamma
    lr_gamma: float = 0.2
    warmup_lr: float = -1.0  # first-epoch lr; -1 = the authors' rule (0.02 except MNIST/digits)
    ema: bool = True
    ema_decay: float = 0.995
    ema_every: str = "epoch"  # one EMA update per epoch (the authors') or per round
    # bookkeeping
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0  # rounds between evaluations (0 = once per epoch)
    checkpoint_every: int = 1  # rounds between checkpoints
    keep_every: int = 0  # epochs between kept checkpoints, to --branch from (0 = none)

    def __post_init__(self) -> None:
        validate(self)

    # -- derived -----------------------------------------------------------
    @property
    def is_baffle(self) -> bool:
        return self.method == "baffle"

    @property
    def round_mode(self) -> str:
        """fedsgd or epoch: fixed by the baselines' names, else by ``mode``."""
        return {"bp-fedsgd": "fedsgd", "bp-fedavg": "epoch"}.get(self.method, self.mode)

    @property
    def resolved_warmup_lr(self) -> float | None:
        if self.warmup_lr < 0:
            return None if self.dataset in ("mnist", "digits") else 0.02
        return self.warmup_lr or None

    @property
    def clip_value(self) -> float | None:
        return self.clip or None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def validate(c: TrainConfig) -> None:
    """One-line ``ConfigError`` for any bad value."""
    def choose(name: str, value: str, options: tuple[str, ...]) -> None:
        if value not in options:
            raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")

    choose("method", c.method, METHODS)
    choose("mode", c.mode, MODES)
    choose("seed sharing", c.seed_sharing, SEED_SHARING)
    choose("split", c.split, SPLITS)
    choose("perturb", c.perturb, PERTURB)
    if c.layer_cycle and c.perturb != "layer":
        raise ConfigError("--layer-cycle applies to --perturb layer")
    if any(b < 0 for b in c.layer_cycle):
        raise ConfigError(f"--layer-cycle holds layer numbers 0, 1, ... (got {c.layer_cycle})")
    choose("sampler", c.sampler, SAMPLERS)
    choose("client optimizer", c.client_optimizer, CLIENT_OPTIMIZER)
    choose("ema every", c.ema_every, EMA_EVERY)
    if c.client_optimizer == "keep" and c.round_mode != "epoch":
        raise ConfigError("--client-optimizer keep applies to local epochs (--mode epoch or "
                          "--method bp-fedavg)")
    choose("engine", c.engine, ENGINES)
    resolve_budget(c.max_memory, "cpu")  # a one-line ConfigError for a bad size
    validate_spec(c.K, c.sigma, c.scheme)
    validate_k_schedule(c.K_milestones, c.K_values)
    positive_ints = {"clients": c.clients, "batch_size": c.batch_size, "chunk": c.chunk,
                     "min_clients": c.min_clients,
                     "checkpoint_every": c.checkpoint_every, "guide_history": c.guide_history,
                     "guide_refresh": c.guide_refresh, "guide_images": c.guide_images}
    for name, v in positive_ints.items():
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1 (got {v!r})")
    for name, v in {"epochs": c.epochs, "rounds": c.rounds, "local_steps": c.local_steps,
                    "eval_every": c.eval_every, "clients_per_round": c.clients_per_round,
                    "keep_every": c.keep_every, "guide_dims": c.guide_dims}.items():
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name} must be an integer >= 0 (got {v!r})")
    if c.epochs == 0 and c.rounds == 0:
        raise ConfigError("set --epochs or --rounds to a positive number")
    if not (0 < c.participation <= 1):
        raise ConfigError(f"participation must be in (0, 1] (got {c.participation!r})")
    if c.clients_per_round > c.clients:
        raise ConfigError(f"clients_per_round={c.clients_per_round} exceeds clients={c.clients}")
    for name, v in {"lr": c.lr, "alpha": c.alpha}.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a finite number > 0 (got {v!r})")
    for name, v in {"clip": c.clip, "weight_decay": c.weight_decay}.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0 (0 = off; got {v!r})")
    if not (0 <= c.ema_decay < 1):
        raise ConfigError(f"ema_decay must be in [0, 1) (got {c.ema_decay!r})")
    if c.guide_dims:
        validate_guide(c)
    elif c.guide_solve:
        raise ConfigError("--guide-solve rebuilds directions that lie in a basis: set "
                          "--guide-dims too")
    if c.method != "baffle" and c.mode != "fedsgd" and c.mode != c.round_mode:
        raise ConfigError(f"--mode does not apply to {c.method}; its name fixes the round structure")


def validate_guide(c: TrainConfig) -> None:
    """Guided directions: BAFFLE FedSGD, directions over every weight, H >= r, and K > r
    for a least-squares rebuild."""
    if not c.is_baffle or c.round_mode != "fedsgd":
        raise ConfigError("--guide-dims applies to BAFFLE FedSGD rounds (--method baffle "
                          "--mode fedsgd)")
    if c.perturb != "all":
        raise ConfigError("--guide-dims confines directions to a subspace of every weight; "
                          "use --perturb all")
    if c.guide_history < c.guide_dims:
        raise ConfigError(f"--guide-history {c.guide_history} holds too few gradients for "
                          f"--guide-dims {c.guide_dims}: use a history >= the dimensions")
    few = min((c.K, *c.K_values))
    if c.guide_solve and few <= c.guide_dims:
        raise ConfigError(f"--guide-solve fits --guide-dims {c.guide_dims} coordinates and an "
                          f"offset from K measurements, so it needs K > {c.guide_dims} at every "
                          f"round (got K={few})")


def validate_k_schedule(milestones: tuple[int, ...], values: tuple[int, ...]) -> None:
    if len(milestones) != len(values):
        raise ConfigError(f"K_milestones has {len(milestones)} epoch(s) but K_values has "
                          f"{len(values)}; give one K per milestone, e.g. --K-milestones 5,10 "
                          "--K-values 50,100")
    if any(m < 0 for m in milestones) or list(milestones) != sorted(set(milestones)):
        raise ConfigError(f"K_milestones must be increasing epochs >= 0 (got {milestones})")
    if any(v < 1 for v in values):
        raise ConfigError(f"K_values must be integers >= 1 (got {values})")


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML/JSON/CLI value to the field's type, with a one-line error."""
    default = _FIELDS[name].default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            kind = float if name == "betas" else int
            return tuple(kind(v) for v in items if str(v).strip() != "")
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"bad value {value!r} for {name}: expected {type(default).__name__}") from None


def from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A config from ``base`` (or the defaults) with ``values`` applied; unknown keys refused."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    changes = {k: _coerce(k, v) for k, v in values.items()}
    return dataclasses.replace(base or TrainConfig(), **changes)


def load_toml(path: str | Path) -> dict[str, Any]:
    """The key/values of a TOML config file (a [train] table or top-level keys)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    return dict(data.get("train", data))


def config_json(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"


def load_json(path: Path) -> TrainConfig:
    return from_dict(json.loads(path.read_text()))
