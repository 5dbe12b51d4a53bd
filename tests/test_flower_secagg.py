"""SecAgg+ of the K loss differences on Flower's simulation engine: the server sees only
the mean, its error is within the quantization bound, training matches plaintext, and
a client dropping out mid-protocol does not stop the round."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from baffle.config import from_dict  # noqa: E402
from baffle.simulator import round_seed, train  # noqa: E402

SIM = Path(__file__).parent / "flower" / "sim_run.py"
# batch 256: one round per epoch, so the K schedule gives round 0 K=6 and round 1 K=4
CFG = {"clients": 4, "K": 6, "rounds": 2, "optimizer": "sgd", "lr": 0.05, "batch-size": 256,
       "K-milestones": "1", "K-values": "4"}


def _config():
    return from_dict({k.replace("-", "_"): v for k, v in CFG.items()})


def _run(tmp_path, mode):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SIM), str(run), "4", json.dumps(CFG), mode],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and (run / "summary.json").exists(), r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    return run, rows, plain


def _check_aggregates(rows, plain, survivors):
    """|secure mean - plaintext mean| <= sigma * 2c / 2^22 per entry: one stochastic
    rounding step of Flower's quantizer (clients scaled by n_c / max_weight = 1)."""
    cfg = _config()
    for r in rows:
        ps = [p for p in plain if p["seed"] == round_seed(cfg, r["round"])]
        assert sorted(p["client"] for p in ps) == survivors
        w = np.array([p["n"] for p in ps], float)
        mean = (w[:, None] * np.array([p["d"] for p in ps])).sum(0) / w.sum()
        err = np.abs(np.array(r["aggregate"]) - mean).max()
        bound = cfg.sigma * 2 * r["secagg_clip"] / 2**22
        assert err <= bound, (err, bound)
        assert np.abs(mean).max() > 100 * bound  # the bound is not vacuous
        assert r["secagg_clients"] == len(survivors) and r["accepted"] == 1
    assert [len(r["aggregate"]) for r in rows] == [r["K"] for r in rows] == [6, 4]


def test_secagg_matches_plaintext_within_quantization(tmp_path):
    run, rows, plain = _run(tmp_path, "secagg")
    _check_aggregates(rows, plain, [0, 1, 2, 3])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the clients ran as one-thread Ray actors
    try:
        train(_config(), run_dir=tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    # Round 0's weights differ only by the quantization error (~1e-9). From round 1 on,
    # that moves each loss by ~1 float32 ulp (2.4e-7 at L~2.3), which is ~0.5% of a
    # d_k at sigma=1e-4: finite differences amplify it (plaintext runs differing in one
    # ulp do the same). Measured: the two runs' total updates differ by 0.14% (2 rounds).
    from baffle.simulator import setup

    w0 = setup(_config()).server.model.state_dict()
    secure = torch.load(run / "checkpoint.pt", weights_only=False)["server"]["model"]
    plain_model = torch.load(tmp_path / "ref" / "checkpoint.pt",
                             weights_only=False)["server"]["model"]
    d_sec = torch.cat([(secure[k] - w0[k]).flatten() for k in w0])
    d_pln = torch.cat([(plain_model[k] - w0[k]).flatten() for k in w0])
    assert float((d_sec - d_pln).norm() / d_pln.norm()) < 0.01


def test_secagg_survives_a_dropout_mid_protocol(tmp_path):
    run, rows, plain = _run(tmp_path, "secagg-dropout")
    _check_aggregates(rows, plain, [0, 2, 3])
