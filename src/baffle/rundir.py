"""The run directory: resolved config, per-round metrics, atomic checkpoints, summary.

    RUN_DIR/config.json      the resolved TrainConfig
    RUN_DIR/metrics.jsonl    one JSON object per finished round
    RUN_DIR/checkpoint.pt    server state after the last checkpointed round (atomic)
    RUN_DIR/kept/epoch-E.pt  (--keep-every) the same state at the end of epoch E, kept
    RUN_DIR/summary.json     final numbers; summary.md, the same as a table
    RUN_DIR/branch.json      a branched run's source and rounds taken from it (``branch``)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from baffle.config import TrainConfig, config_json, load_json
from baffle.errors import ConfigError

CONFIG, METRICS, CHECKPOINT, SUMMARY = "config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"
BRANCH, KEPT = "branch.json", "kept"


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temp file in the same folder, fsync, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self, config: TrainConfig) -> None:
        if (self.path / CHECKPOINT).exists() or (self.path / METRICS).exists():
            raise ConfigError(
                f"run directory {self.path} already holds a run; continue it (CLI: --resume "
                f"{self.path}; Flower: resume=true) or choose another directory"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.save_config(config)

    def save_config(self, config: TrainConfig) -> None:
        """Write the config (a resumed run that was lengthened or rescheduled replaces it)."""
        atomic_write(self.path / CONFIG, lambda f: f.write(config_json(config).encode()))

    def config(self) -> TrainConfig:
        if not (self.path / CONFIG).is_file():
            raise ConfigError(f"{self.path} is not a run directory (no {CONFIG}); check --resume")
        return load_json(self.path / CONFIG)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.path / CHECKPOINT, lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict[str, Any] | None:
        p = self.path / CHECKPOINT
        return _load(p, "delete it to restart the run from scratch") if p.exists() else None

    def keep_checkpoint(self, epoch: int, state: dict[str, Any]) -> None:
        """Keep ``state``, the server after epoch ``epoch``, beside the rolling checkpoint."""
        self.kept_path(epoch).parent.mkdir(exist_ok=True)
        atomic_write(self.kept_path(epoch), lambda f: torch.save(state, f))

    def kept_epochs(self) -> list[int]:
        """The epochs whose end has a kept checkpoint, in order."""
        d = self.path / KEPT
        names = [p.stem.removeprefix("epoch-") for p in d.glob("epoch-*.pt")] if d.is_dir() else []
        return sorted(int(n) for n in names if n.isdigit())

    def load_kept(self, epoch: int) -> dict[str, Any]:
        p = self.kept_path(epoch)
        if not p.exists():
            kept = ", ".join(map(str, self.kept_epochs())) or "none"
            raise ConfigError(f"{self.path} kept no checkpoint at the end of epoch {epoch} "
                              f"(kept: {kept}); train the source with --keep-every")
        return _load(p, "branch from another epoch or from the last checkpoint")

    def drop_kept_after(self, rounds_done: int, rounds_per_epoch: int) -> None:
        """Delete kept checkpoints past round ``rounds_done``: a resumed run trains them
        again, perhaps under a changed schedule."""
        for e in self.kept_epochs():
            if e * rounds_per_epoch > rounds_done:
                self.kept_path(e).unlink()

    def kept_path(self, epoch: int) -> Path:
        """Where the checkpoint kept at the end of epoch ``epoch`` lives."""
        return self.path / KEPT / f"epoch-{epoch}.pt"

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        p = self.path / METRICS
        if not p.exists():
            return []
        rows = []
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is lost anyway
        return rows

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with ``rows``, atomically."""
        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write(self.path / METRICS, lambda f: f.write(text.encode()))

    def truncate_metrics(self, rounds_done: int) -> list[dict[str, Any]]:
        """Keep rows of rounds < ``rounds_done`` (those the checkpoint covers)."""
        rows = [r for r in self.metrics() if r["round"] < rounds_done]
        self.write_metrics(rows)
        return rows

    def save_branch(self, provenance: dict[str, Any]) -> None:
        (self.path / BRANCH).write_text(json.dumps(provenance, indent=2) + "\n")

    def branch_info(self) -> dict[str, Any] | None:
        """A branched run's source and rounds taken from it; None for any other run."""
        p = self.path / BRANCH
        return json.loads(p.read_text()) if p.exists() else None

    def write_summary(self, summary: dict[str, Any], table: str) -> None:
        (self.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        (self.path / "summary.md").write_text(table + "\n")


def _load(p: Path, advice: str) -> dict[str, Any]:
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ConfigError(f"checkpoint {p} is unreadable ({type(e).__name__}); {advice}") from None
