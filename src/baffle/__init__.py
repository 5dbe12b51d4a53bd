"""baffle: backpropagation-free federated learning (Feng et al., arXiv 2301.12195).

Data flow, one module per role:
seed -> directions -> estimator (K loss differences) -> aggregate -> reconstruct
(gradient in p.grad) -> server (stock torch.optim step, EMA) ; client, simulator, cli.
"""

from baffle.aggregate import Upload, aggregate_gradient, mean_diffs
from baffle.client import fedsgd_update, local_epoch_update, local_optimizer, replay_local_epoch
from baffle.config import TrainConfig, from_dict, load_toml
from baffle.directions import SCHEME_VERSION, DirectionScheme, derive_seed, direction
from baffle.errors import BaffleError, ConfigError, DataError, SchemeMismatchError, UploadError
from baffle.estimator import Estimate, EstimatorSpec, loss_differences
from baffle.reconstruct import rebuild_gradient, rescale_inf_norm, write_grads
from baffle.server import Server, make_optimizer
from baffle.simulator import RunResult, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "SCHEME_VERSION",
    "BaffleError",
    "ConfigError",
    "DataError",
    "DirectionScheme",
    "Estimate",
    "EstimatorSpec",
    "RunResult",
    "SchemeMismatchError",
    "Server",
    "TrainConfig",
    "Upload",
    "UploadError",
    "aggregate_gradient",
    "derive_seed",
    "direction",
    "evaluate",
    "fedsgd_update",
    "from_dict",
    "load_toml",
    "local_epoch_update",
    "local_optimizer",
    "loss_differences",
    "make_optimizer",
    "mean_diffs",
    "rebuild_gradient",
    "replay_local_epoch",
    "rescale_inf_norm",
    "train",
    "write_grads",
]
