"""SecAgg+ of the K loss differences on Flower's simulation engine: the server sees only
the mean, its error is within the quantization bound, training matches plaintext, and
a client dropping out mid-protocol does not stop the round. With --guide-dims the basis
reaches each node once, inside its fit instructions."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from baffle.config import from_dict  # noqa: E402
from baffle.simulator import round_seed, setup, train  # noqa: E402

SIM = Path(__file__).parent / "flower" / "sim_run.py"
# batch 256: one round per epoch, so the K schedule gives round 0 K=6 and round 1 K=4
CFG = {"clients": 4, "K": 6, "rounds": 2, "optimizer": "sgd", "lr": 0.05, "batch-size": 256,
       "K-milestones": "1", "K-values": "4"}
# --guide-dims: the server's gradients pick a basis at round 3 (history 3, refresh 3)
# sigma 1e-2: a loss's float32 round-off moves d_k / sigma 100x less than at 1e-4, so
# six rounds of SecAgg+'s (unseeded) stochastic rounding stay far below 1% of the update
GUIDED = {"clients": 4, "K": 6, "rounds": 6, "optimizer": "sgd", "lr": 0.05, "sigma": 1e-2,
          "batch-size": 64, "guide-dims": 2, "guide-history": 3, "guide-refresh": 3,
          "guide-images": 64}


def _config(values=CFG):
    """The TrainConfig of a run config (less the Flower-only and SecAgg+ keys)."""
    skip = {"resume", "secagg-clip"}
    return from_dict({k.replace("-", "_"): v for k, v in values.items() if k not in skip})


def _run(tmp_path, mode, values=CFG):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(SIM), str(run), "4", json.dumps(values), mode],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0 and (run / "summary.json").exists(), r.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    plain = [json.loads(x) for x in (tmp_path / "plain.jsonl").read_text().splitlines()]
    return run, rows, plain


def _check_aggregates(rows, plain, survivors, values=CFG):
    """|secure mean - plaintext mean| <= sigma * 2c / 2^22 per entry: one stochastic
    rounding step of Flower's quantizer (clients scaled by n_c / max_weight = 1).
    ``survivors``: the clients each round aggregates (one list per round)."""
    cfg = _config(values)
    assert len(survivors) == len(rows)
    for r, alive in zip(rows, survivors):
        ps = [p for p in plain if p["seed"] == round_seed(cfg, r["round"])]
        assert sorted(p["client"] for p in ps) == alive
        w = np.array([p["n"] for p in ps], float)
        mean = (w[:, None] * np.array([p["d"] for p in ps])).sum(0) / w.sum()
        err = np.abs(np.array(r["aggregate"]) - mean).max()
        bound = cfg.sigma * 2 * r["secagg_clip"] / 2**22
        assert err <= bound, (err, bound)
        assert np.abs(mean).max() > 100 * bound  # the bound is not vacuous
        assert r["secagg_clients"] == len(alive) and r["accepted"] == 1


def _train_one_thread(values, run_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the clients ran as one-thread Ray actors
    try:
        return train(_config(values), run_dir=run_dir)
    finally:
        torch.set_num_threads(threads)


def _update_gap(run, ref, values, start=None):
    """|secure update - plaintext update| / |plaintext update|, both from the initial
    weights (or the state dict ``start``), for the runs in folders ``run`` and ``ref``."""
    w0 = start if start is not None else setup(_config(values)).server.model.state_dict()
    secure = torch.load(run / "checkpoint.pt", weights_only=False)["server"]["model"]
    plain = torch.load(ref / "checkpoint.pt", weights_only=False)["server"]["model"]
    d_sec = torch.cat([(secure[k] - w0[k]).flatten() for k in w0])
    d_pln = torch.cat([(plain[k] - w0[k]).flatten() for k in w0])
    return float((d_sec - d_pln).norm() / d_pln.norm())


def test_secagg_matches_plaintext_within_quantization(tmp_path):
    run, rows, plain = _run(tmp_path, "secagg")
    _check_aggregates(rows, plain, [[0, 1, 2, 3]] * 2)
    assert [len(r["aggregate"]) for r in rows] == [r["K"] for r in rows] == [6, 4]
    # the protocol's own messages: K 4 -> 6 adds two int64 entries to the masked vector
    # upload, and the download holds the fit instructions (weights) and more
    up = [r["protocol_bytes_up_per_client"] for r in rows]
    assert up[0] - up[1] == 8 * (6 - 4)
    assert all(r["protocol_bytes_up_per_client"] > 10 * r["bytes_up_per_client"] for r in rows)
    assert all(r["protocol_bytes_down_per_client"] > r["bytes_down_per_client"] for r in rows)
    _train_one_thread(CFG, tmp_path / "ref")
    # Round 0's weights differ only by the quantization error (~1e-9). From round 1 on,
    # that moves each loss by ~1 float32 ulp (2.4e-7 at L~2.3), which is ~0.5% of a
    # d_k at sigma=1e-4: finite differences amplify it (plaintext runs differing in one
    # ulp do the same). Measured: the two runs' total updates differ by 0.14% (2 rounds).
    assert _update_gap(run, tmp_path / "ref", CFG) < 0.01


def test_secagg_survives_a_dropout_mid_protocol(tmp_path):
    run, rows, plain = _run(tmp_path, "secagg-dropout")
    _check_aggregates(rows, plain, [[0, 2, 3]] * 2)
    assert [len(r["aggregate"]) for r in rows] == [r["K"] for r in rows] == [6, 4]


def _basis_and_plain_bytes():
    fed = setup(_config(GUIDED))
    return 4 * fed.n_params * GUIDED["guide-dims"], 4 * fed.n_params + 8


def test_secagg_sends_the_basis_once_and_trains_as_plaintext_does(tmp_path):
    run, rows, plain = _run(tmp_path, "secagg", GUIDED)
    _check_aggregates(rows, plain, [[0, 1, 2, 3]] * 6, GUIDED)
    ref = _train_one_thread(GUIDED, tmp_path / "ref")
    basis, base = _basis_and_plain_bytes()
    down = [base, base, base, base + basis, base, base]
    assert [r["bytes_down_per_client"] for r in rows] == down
    assert [r["bytes_down_per_client"] for r in ref.metrics] == down  # as plaintext counts
    # the protocol's messages carry it too: the basis array (with its .npy header) in round 3
    proto = [r["protocol_bytes_down_per_client"] for r in rows]
    assert 0 < proto[3] - proto[2] - basis < 300, (proto, basis)
    # Rounds 3-5 step along the basis. Measured: the secure run's update is 4-6e-5 of its
    # size away from the plaintext run's, and 0.49 away from that of a run that never
    # guides, which is where a server rebuilding in another span than the nodes' would be.
    unguided = {**GUIDED, "guide-dims": 0}
    _train_one_thread(unguided, tmp_path / "unguided")
    assert _update_gap(run, tmp_path / "ref", GUIDED) < 1e-3
    assert _update_gap(run, tmp_path / "unguided", unguided) > 0.1


def test_secagg_sums_what_a_least_squares_rebuild_needs(tmp_path):
    """--guide-solve: the server fits the span's coordinates to the summed scalars, as a
    plaintext run fits them to the plain mean (K = 6 measurements, r = 2 coordinates).
    No momentum, so that rounds 3-5 move by their own (guided) gradients alone."""
    mean = {**GUIDED, "momentum": 0.0}
    solving = {**mean, "guide-solve": True}
    run, rows, plain = _run(tmp_path, "secagg", solving)
    _check_aggregates(rows, plain, [[0, 1, 2, 3]] * 6, solving)
    _train_one_thread(solving, tmp_path / "ref")
    _train_one_thread(mean, tmp_path / "mean")
    _train_one_thread({**mean, "rounds": 3}, tmp_path / "start")
    start = torch.load(tmp_path / "start" / "checkpoint.pt", weights_only=False)["server"]["model"]
    # Measured over rounds 3-5 (from round 3's plaintext weights, so the quantization's
    # trace on rounds 0-2 counts too): the secure update is 0.4% of its size from the
    # plaintext solve's, and 63% from that of the plaintext run that averages instead
    assert _update_gap(run, tmp_path / "ref", solving, start) < 0.02
    assert _update_gap(run, tmp_path / "mean", mean, start) > 0.3


def test_a_resumed_secagg_server_resends_the_basis_and_trains_on(tmp_path):
    """A server stopped after round 3 (its basis sent) and resumed by a new Flower run: its
    new nodes hold nothing, so round 4 sends the basis to all four; the weights are the
    uninterrupted plaintext run's up to the quantization."""
    for rounds, resume in ((4, False), (6, True)):
        run, rows, plain = _run(tmp_path, "secagg", {**GUIDED, "rounds": rounds,
                                                     "resume": resume})
    assert [r["round"] for r in rows] == list(range(6))
    _check_aggregates(rows, plain, [[0, 1, 2, 3]] * 6, GUIDED)
    basis, base = _basis_and_plain_bytes()
    assert [r["bytes_down_per_client"] for r in rows] == \
        [base, base, base, base + basis, base + basis, base]
    _train_one_thread(GUIDED, tmp_path / "ref")
    assert _update_gap(run, tmp_path / "ref", GUIDED) < 1e-3


def test_a_secagg_node_that_lost_the_basis_drops_out_once_and_is_sent_it_again(tmp_path):
    """Node 1 loses its basis before round 4: its fit fails with the one-line error naming
    the basis, SecAgg+ aggregates the other three, and round 5 sends the basis to node 1
    alone (a quarter of a basis per sender, on average)."""
    run, rows, plain = _run(tmp_path, "secagg-guide-faults", GUIDED)
    _check_aggregates(rows, plain, [[0, 1, 2, 3]] * 4 + [[0, 2, 3], [0, 1, 2, 3]], GUIDED)
    assert [r["rejected"] for r in rows] == [0, 0, 0, 0, 1, 0]
    (why,) = rows[4]["rejections"]
    assert "does not hold the server's basis" in why["reason"] and "\n" not in why["reason"], why
    basis, base = _basis_and_plain_bytes()
    assert [r["bytes_down_per_client"] for r in rows] == \
        [base, base, base, base + basis, base, base + basis // 4]


def test_a_clip_too_small_fails_every_fit_in_one_line_and_the_halted_rounds_are_logged(
        tmp_path):
    """secagg-clip 1e-3 is far below every |d / sigma|: each client refuses to have its
    vector clipped, SecAgg+ halts both rounds below its threshold, and each round is
    logged as failed with the model unchanged and the clients' reason."""
    run, rows, plain = _run(tmp_path, "secagg", {**CFG, "secagg-clip": 1e-3})
    assert [r["round"] for r in rows] == [0, 1]
    assert [(r["accepted"], r["rejected"]) for r in rows] == [(0, 4), (0, 4)]
    assert all("model unchanged" in r["note"] for r in rows)
    for r in rows:
        for why in r["rejections"]:
            assert "SecAgg+ halted" in why["reason"] and "secagg-clip >=" in why["reason"], why
            assert "\n" not in why["reason"]
    w0 = setup(_config()).server.model.state_dict()
    final = torch.load(run / "checkpoint.pt", weights_only=False)["server"]["model"]
    assert all(torch.equal(w0[k], final[k]) for k in w0)
    assert len(plain) == 8  # every client did compute its vector: the clip refused it


def test_check_clip_refuses_exactly_what_the_quantizer_would_clip():
    from baffle.errors import ConfigError
    from baffle.flower.secagg import check_clip

    u = torch.tensor([0.5, -3.0, 1.0], dtype=torch.float64)
    config = {"secagg-clip": 2.0, "secagg-max-weight": 32}
    check_clip(u, 16, config)  # scaled by 16/32: |u| 1.5 <= 2
    with pytest.raises(ConfigError, match="reaches 3, beyond the SecAgg.* clipping range 2") as e:
        check_clip(u, 32, config)
    assert "secagg-clip >= 6" in str(e.value) and "\n" not in str(e.value)
