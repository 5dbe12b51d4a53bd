"""Aggregation: validate client uploads and combine them into one gradient.

A BAFFLE upload is K scalars per local step. With a shared round seed the server forms
the example-weighted mean  dbar = sum_c w_c d_c / sum_c w_c  and rebuilds once; with
per-client seeds it rebuilds each client and takes the same weighted mean of gradients.
By linearity of the rebuild both equal the mean of per-client rebuilds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from baffle.directions import DirectionCache, DirectionScheme
from baffle.estimator import EstimatorSpec
from baffle.reconstruct import rebuild_gradient


@dataclass(frozen=True)
class Upload:
    """What one client sends back in a round.

    ``diffs`` holds K loss differences per local step: shape (K,) for FedSGD, (E, K) for
    an epoch of E local steps; ``seeds`` are the seeds it used, one per local step.
    Backprop baselines upload a gradient or model instead, in ``tensors``.
    ``optim_base`` is the digest of the local optimizer state the epoch started from
    (``client.optimizer_digest``; 0: a fresh optimizer).
    """

    client: int
    num_examples: int
    seeds: tuple[int, ...] = ()
    diffs: torch.Tensor | None = None
    tensors: tuple[torch.Tensor, ...] = ()
    loss: float = float("nan")
    forward_passes: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    optim_base: int = 0


def upload_problem(upload: Upload, K: int, steps: int | None = None) -> str | None:
    """Why a BAFFLE upload is unusable, or ``None`` if it is fine."""
    d = upload.diffs
    if d is None:
        return "no loss differences"
    if not isinstance(d, torch.Tensor):
        return f"loss differences are a {type(d).__name__}, not a tensor"
    want = (K,) if steps is None else (steps, K)
    if tuple(d.shape) != want:
        return f"wrong length: shape {tuple(d.shape)}, expected {want}"
    if not torch.isfinite(d).all():
        return "non-finite loss differences (NaN or inf)"
    if len(upload.seeds) != (1 if steps is None else steps):
        return f"{len(upload.seeds)} seeds for {1 if steps is None else steps} steps"
    if not (isinstance(upload.num_examples, int) and upload.num_examples > 0):
        return f"bad example count {upload.num_examples!r}"
    return None


def tensors_problem(upload: Upload, shapes: Sequence[torch.Size]) -> str | None:
    """Why a backprop upload (gradient or model tensors) is unusable, or ``None``."""
    if len(upload.tensors) != len(shapes):
        return f"wrong length: {len(upload.tensors)} tensors, expected {len(shapes)}"
    for t, s in zip(upload.tensors, shapes):
        if t.shape != s:
            return f"wrong shape {tuple(t.shape)}, expected {tuple(s)}"
        if not torch.isfinite(t).all():
            return "non-finite values (NaN or inf)"
    if not (isinstance(upload.num_examples, int) and upload.num_examples > 0):
        return f"bad example count {upload.num_examples!r}"
    return None


def weights_of(uploads: Sequence[Upload]) -> list[float]:
    """Aggregation weights: the clients' example counts, normalised to sum to 1."""
    total = sum(u.num_examples for u in uploads)
    return [u.num_examples / total for u in uploads]


def mean_diffs(uploads: Sequence[Upload]) -> torch.Tensor:
    """Example-weighted mean of the clients' K-vectors (shared-seed rounds)."""
    w = torch.tensor(weights_of(uploads), dtype=torch.float64)
    stacked = torch.stack([u.diffs.double() for u in uploads])
    return (w @ stacked).float()


def weighted_tensors(
    tensor_lists: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]
) -> list[torch.Tensor]:
    """sum_c w_c T_c for lists of same-shaped tensors."""
    out = [torch.zeros_like(t) for t in tensor_lists[0]]
    for w, ts in zip(weights, tensor_lists):
        for o, t in zip(out, ts):
            o.add_(t, alpha=w)
    return out


def aggregate_gradient(
    uploads: Sequence[Upload],
    shapes: Sequence[torch.Size],
    spec: EstimatorSpec,
    dirs: DirectionScheme,
    shared_seed: bool,
    device: torch.device | str = "cpu",
    cache: DirectionCache | None = None,
) -> list[torch.Tensor]:
    """The round's gradient estimate from validated FedSGD uploads."""
    if shared_seed:
        seed = uploads[0].seeds[0]
        if any(u.seeds[0] != seed for u in uploads):
            raise ValueError("shared-seed round with differing seeds")
        return rebuild_gradient(shapes, seed, mean_diffs(uploads), spec, dirs, device, cache)
    grads = [rebuild_gradient(shapes, u.seeds[0], u.diffs, spec, dirs, device, cache)
             for u in uploads]
    return weighted_tensors(grads, weights_of(uploads))

