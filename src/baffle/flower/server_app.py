"""Flower ServerApp: reads the run config into a TrainConfig and runs BaffleStrategy.

Run config keys are TrainConfig fields with dashes (``K``, ``sigma``, ``batch-size``...),
plus ``run-dir`` (write a baffle run directory there), ``resume`` and ``round-timeout``.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from baffle.flower.strategy import BaffleStrategy
from baffle.flower.wire import config_from_run_config, weights_record
from baffle.simulator import RunLog, setup

log = logging.getLogger("baffle.flower")


def make_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` are run-config values applied over Flower's run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, flower = config_from_run_config({**dict(context.run_config), **(overrides or {})})
        run_log = RunLog(flower["run-dir"] or None)
        fed = setup(cfg)
        start, metrics = run_log.open(fed, bool(flower["resume"]))
        strategy = BaffleStrategy(fed, run_log, start, metrics, min_available=cfg.clients,
                                  wait_s=float(flower["round-timeout"]))
        strategy.start(grid, weights_record(fed.server.model),
                       num_rounds=fed.total_rounds - start,
                       timeout=float(flower["round-timeout"]))
        result = run_log.close(fed, strategy.metrics)
        print(f"baffle-summary: {result.summary}", flush=True)

    return app


app = make_server_app()
