"""BAFFLE on Flower's simulation engine: same numbers as the in-process simulator;
faulty clients are dropped with a logged reason; too few valid replies leave the model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from baffle.config import from_dict  # noqa: E402
from baffle.simulator import train  # noqa: E402

SIM = Path(__file__).parent / "flower" / "sim_run.py"


def _simulate(run_dir, n, overrides, faulty=False):
    args = [sys.executable, str(SIM), str(run_dir), str(n), json.dumps(overrides)]
    r = subprocess.run(args + (["faulty"] if faulty else []), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "summary.json").exists(), r.stderr[-3000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _model(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["server"]["model"]


@pytest.mark.parametrize("overrides", [
    {"clients": 3, "K": 5, "rounds": 3},
    # with a K schedule: round 1 (epoch 1) sends, uploads and replays K=6
    {"clients": 3, "K": 4, "rounds": 2, "mode": "epoch", "local-steps": 3,
     "seed-sharing": "client", "K-milestones": "1", "K-values": "6"},
    # layer directions: the clients draw and the server rebuilds them per layer
    {"clients": 2, "K": 4, "rounds": 2, "perturb": "layer"},
], ids=["fedsgd-round-seed", "epoch-client-seed-k-schedule", "layer-directions"])
def test_flower_simulation_equals_in_process_simulator(tmp_path, overrides):
    rows = _simulate(tmp_path / "flower", overrides["clients"], overrides)
    # Ray runs each virtual client with one intra-op thread; float sums over a different
    # thread split round differently, so the reference uses one thread too.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train(from_dict({k.replace("-", "_"): v for k, v in overrides.items()}),
                    run_dir=tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    assert [r["accepted"] for r in rows] == [overrides["clients"]] * overrides["rounds"]
    assert [r["K"] for r in rows] == [r["K"] for r in ref.metrics]
    a, b = _model(tmp_path / "flower"), _model(tmp_path / "ref")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert rows[-1]["test_top1"] == pytest.approx(ref.metrics[-1]["test_top1"])


def test_faulty_clients_are_dropped_and_too_few_leave_the_model(tmp_path):
    base = {"clients": 6, "K": 5, "rounds": 2, "min-clients": 2}
    rows = _simulate(tmp_path / "a", 6, base, faulty=True)
    for r in rows:
        assert r["accepted"] == 2 and r["rejected"] == 4 and "note" not in r
        reasons = " | ".join(x["reason"] for x in r["rejections"])
        for fragment in ("lost power", "wrong length", "non-finite", "version"):
            assert fragment in reasons, reasons
    start = from_dict({"clients": 6})
    from baffle.simulator import setup

    init = setup(start).server.model.state_dict()
    moved = _model(tmp_path / "a")
    assert any(not torch.equal(init[k], moved[k]) for k in init)

    rows = _simulate(tmp_path / "b", 6, {**base, "min-clients": 3}, faulty=True)
    assert all("fewer than min_clients=3: model unchanged" in r["note"] for r in rows)
    kept = _model(tmp_path / "b")
    assert all(torch.equal(init[k], kept[k]) for k in init)
