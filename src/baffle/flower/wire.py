"""Mapping between baffle's objects and Flower records.

Server -> client (one ``train`` message): ArrayRecord ``arrays`` (the weights) and
ConfigRecord ``config`` holding the round, the seed, the lr, the round's K (after the K
schedule), sigma, the scheme and the direction scheme's version and fingerprint.
Client -> server: ArrayRecord ``upload`` (the K loss differences per local step, or the
baselines' tensors) and MetricRecord ``metrics`` (client id, example count, seeds, loss,
forward passes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from baffle.aggregate import Upload
from baffle.config import TrainConfig, from_dict
from baffle.directions import DirectionScheme
from baffle.errors import ConfigError
from baffle.estimator import EstimatorSpec

# Flower-only run-config keys (everything else is a TrainConfig field, dashes for underscores)
FLOWER_KEYS = {"run-dir": "", "round-timeout": 600.0, "resume": False}


def config_from_run_config(run_config: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Split a Flower run config into our TrainConfig and the Flower-only settings."""
    flower = {k: run_config.get(k, v) for k, v in FLOWER_KEYS.items()}
    values = {k.replace("-", "_"): v for k, v in run_config.items() if k not in FLOWER_KEYS}
    config = from_dict(values)
    if config.client_optimizer != "fresh":
        raise ConfigError("client-optimizer = \"keep\" runs only in the in-process simulator "
                          "(baffle train): Flower clients keep no optimizer state between rounds")
    return config, flower


def round_config(round_: int, seed: int, lr: float, spec: EstimatorSpec,
                 dirs: DirectionScheme) -> ConfigRecord:
    """What the server sends with the weights; ``spec`` is the round's (scheduled) estimator."""
    return ConfigRecord({
        "round": round_, "seed": seed, "lr": lr, "K": spec.K, "sigma": spec.sigma,
        "scheme": spec.scheme, "scheme-version": dirs.version, "fingerprint": dirs.fingerprint(),
    })


def check_round_spec(mine: EstimatorSpec, sent: ConfigRecord | dict[str, Any]) -> None:
    """Raise ``ConfigError`` unless the server's (K, sigma, scheme) for the round is ours."""
    theirs = (int(sent["K"]), float(sent["sigma"]), str(sent["scheme"]))
    if theirs != (mine.K, mine.sigma, mine.scheme):
        raise ConfigError(f"the server's round estimator (K, sigma, scheme) = {theirs} is not "
                          f"this client's {(mine.K, mine.sigma, mine.scheme)}: run both with "
                          "the same run config (K, K-milestones, K-values, sigma, scheme)")


def weights_record(model: torch.nn.Module) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in model.state_dict().items()})


def load_weights(model: torch.nn.Module, record: ArrayRecord) -> None:
    state = {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}
    model.load_state_dict(state)


def upload_to_content(u: Upload) -> RecordDict:
    arrays = {}
    if u.diffs is not None:
        arrays["diffs"] = Array(u.diffs.detach().cpu().numpy())
    for i, t in enumerate(u.tensors):
        arrays[f"t{i:04d}"] = Array(t.detach().cpu().numpy())
    metrics = MetricRecord({"client": u.client, "num-examples": u.num_examples,
                            "seeds": list(u.seeds), "loss": float(u.loss),
                            "forward-passes": u.forward_passes})
    return RecordDict({"upload": ArrayRecord(arrays), "metrics": metrics})


def content_to_upload(content: RecordDict) -> Upload:
    """Rebuild an Upload from a reply; malformed fields raise ``ValueError``/``KeyError``."""
    m = content["metrics"]
    arrays = content["upload"]
    diffs = (torch.from_numpy(np.array(arrays["diffs"].numpy(), dtype=np.float32))
             if "diffs" in arrays else None)
    tensors = tuple(torch.from_numpy(arrays[k].numpy().copy()) for k in sorted(arrays)
                    if k.startswith("t"))
    seeds = m.get("seeds", [])
    return Upload(int(m["client"]), int(m["num-examples"]),
                  tuple(int(s) for s in (seeds if isinstance(seeds, list) else [seeds])), diffs,
                  tensors, loss=float(m.get("loss", float("nan"))),
                  forward_passes=int(m.get("forward-passes", 0)))
