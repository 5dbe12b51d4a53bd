"""Mapping between baffle's objects and Flower records.

Server -> client (one ``train`` message): ArrayRecord ``arrays`` (the weights) and
ConfigRecord ``config`` holding the round, the seed, the lr, the round's K (after the K
schedule), sigma, the scheme and the direction scheme's version and fingerprint, and,
with a kept client optimizer in epoch mode, each client's ``optim-digests`` entry. With
``--guide-dims`` the config also names the round's basis (``basis-digest``), and a node the
server does not know to hold it gets ArrayRecord ``basis`` too (U, d x r float32).
Client -> server: ArrayRecord ``upload`` (the K loss differences per local step, or the
baselines' tensors) and MetricRecord ``metrics`` (client id, example count, seeds, loss,
forward passes, the digest of the optimizer state its epoch started from).
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from baffle.aggregate import Upload
from baffle.config import TrainConfig, from_dict
from baffle.directions import Basis, DirectionScheme
from baffle.errors import ConfigError
from baffle.estimator import EstimatorSpec

# Flower-only run-config keys (everything else is a TrainConfig field, dashes for underscores)
FLOWER_KEYS = {"run-dir": "", "round-timeout": 600.0, "resume": False}


def config_from_run_config(run_config: dict[str, Any]) -> tuple[TrainConfig, dict[str, Any]]:
    """Split a Flower run config into our TrainConfig and the Flower-only settings."""
    flower = {k: run_config.get(k, v) for k, v in FLOWER_KEYS.items()}
    values = {k.replace("-", "_"): v for k, v in run_config.items() if k not in FLOWER_KEYS}
    return from_dict(values), flower


def round_config(round_: int, seed: int, lr: float, spec: EstimatorSpec,
                 dirs: DirectionScheme, optim_digests: Sequence[int] | None = None
                 ) -> ConfigRecord:
    """What the server sends with the weights; ``spec`` is the round's (scheduled) estimator.

    ``optim_digests[c]`` (BAFFLE epoch mode with a kept client optimizer) is the digest of
    the local optimizer state the server will replay client ``c``'s epoch from (0: fresh)."""
    record = {
        "round": round_, "seed": seed, "lr": lr, "K": spec.K, "sigma": spec.sigma,
        "scheme": spec.scheme, "scheme-version": dirs.version, "fingerprint": dirs.fingerprint(),
    }
    if optim_digests is not None:
        record["optim-digests"] = [int(d) for d in optim_digests]
    if dirs.basis is not None:
        record["basis-digest"] = dirs.basis.digest
    return ConfigRecord(record)


def basis_record(basis: Basis) -> ArrayRecord:
    """The basis U (d x r float32) as sent to a node that lacks it."""
    return ArrayRecord({"U": Array(torch.cat(basis.blocks).numpy())})


def record_basis(record: ArrayRecord | None, sizes: Sequence[int], digest: str) -> Basis:
    """The basis held in ``record`` if it is the one named ``digest``, else ``ConfigError``
    (a node that lost it, or a damaged copy: the server sends it again next round)."""
    basis = None
    if record is not None and "U" in record:
        try:
            basis = Basis(torch.from_numpy(np.array(record["U"].numpy(), dtype=np.float32)),
                          sizes)
        except ValueError:  # another shape: not this run's basis
            basis = None
    if basis is None or basis.digest != digest:
        held = "none" if basis is None else basis.digest
        raise ConfigError(f"this node does not hold the server's basis {digest} (it holds "
                          f"{held}; restarted?): the server sends it again next round")
    return basis


BASIS_KEY = "baffle-basis"  # where a node keeps the latest basis, in Context.state


def kept_basis(state: RecordDict, digest: str | None, sent: ArrayRecord | None,
               sizes: Sequence[int]) -> Basis | None:
    """Node side: the basis a round names by ``digest`` (None: none yet). ``sent`` (the
    server's copy, when the message carries one) is first kept in the node's ``state``;
    ``ConfigError`` if the node then holds another basis or none (``record_basis``)."""
    if digest is None:
        return None
    if sent is not None:
        state[BASIS_KEY] = sent
    record = state.get(BASIS_KEY)
    return record_basis(record if isinstance(record, ArrayRecord) else None, sizes, digest)


class BasisHolders:
    """Server side: which node holds which basis, so that U (4 d r bytes) goes only to
    the nodes that lack the latest one. A node holds the basis a round named once it has
    answered that round; a node that did not answer (failed, dropped out, restarted) may
    not, and is sent it again. A new server (a new Flower run) knows of no holder."""

    def __init__(self) -> None:
        self._digest: dict[int, str] = {}  # node id -> digest of the basis it holds

    def lacking(self, nodes: Sequence[int], basis: Basis | None) -> set[int]:
        """The ``nodes`` to send ``basis`` to (none without a basis)."""
        if basis is None:
            return set()
        return {n for n in nodes if self._digest.get(n) != basis.digest}

    def settle(self, asked: Sequence[int], answered: Sequence[int], basis: Basis | None
               ) -> None:
        """After a round that asked ``asked`` and heard back from ``answered``."""
        for n in asked:
            self._digest.pop(n, None)
        if basis is not None:
            for n in answered:
                self._digest[n] = basis.digest


def error_line(reason: object) -> str:
    """A failed node's error as one line: its last line, less the colour codes and the
    wrapping that Ray and Flower add around the exception's own message."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(reason)).strip().removesuffix("'>")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else text).split("Message: ", 1)[-1]


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
                            "forward-passes": u.forward_passes, "optim-base": u.optim_base})
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
                  forward_passes=int(m.get("forward-passes", 0)),
                  optim_base=int(m.get("optim-base", 0)))


def states_record(states: Sequence[dict[str, Any]]) -> ConfigRecord:
    """A client's kept local optimizer states (oldest first), for ``Context.state``."""
    blobs = []
    for state in states:
        buf = io.BytesIO()
        torch.save(state, buf)
        blobs.append(buf.getvalue())
    return ConfigRecord({"states": blobs} if blobs else {})


def record_states(record: ConfigRecord | None) -> list[dict[str, Any]]:
    """Inverse of ``states_record`` (empty for a node that kept nothing yet)."""
    if record is None or "states" not in record:
        return []
    blobs = record["states"]
    return [torch.load(io.BytesIO(b), weights_only=True)
            for b in (blobs if isinstance(blobs, list) else [blobs])]
