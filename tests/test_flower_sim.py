"""BAFFLE on Flower's simulation engine: same numbers as the in-process simulator;
faulty clients are dropped with a logged reason; too few valid replies leave the model."""

import copy
import json
import os
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
    """A Flower simulation of ``n`` nodes, every process of it on one intra-op thread: Ray
    gives each virtual client one, and the ServerApp's own float sums (the server's guide
    gradient, the rebuild) round differently over a different thread split (on an AVX-512
    Xeon, past the 1e-6 the equality tests allow), so the references use one thread too."""
    args = [sys.executable, str(SIM), str(run_dir), str(n), json.dumps(overrides)]
    r = subprocess.run(args + (["faulty"] if faulty else []), capture_output=True, text=True,
                       timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
    # kept client optimizers: each node keeps its own in Flower's Context.state, and the
    # server replays from its copy
    {"clients": 3, "K": 4, "rounds": 3, "mode": "epoch", "local-steps": 2,
     "seed-sharing": "client", "client-optimizer": "keep"},
    {"clients": 2, "rounds": 3, "method": "bp-fedavg", "local-steps": 2,
     "client-optimizer": "keep"},
    # server-guided directions: the server's gradients pick a basis on rounds 2 and 4, which
    # it sends to each node once; the nodes draw every direction in it
    {"clients": 2, "K": 4, "rounds": 6, "guide-dims": 2, "guide-history": 3,
     "guide-refresh": 2, "guide-images": 64, "seed-sharing": "client"},
], ids=["fedsgd-round-seed", "epoch-client-seed-k-schedule", "layer-directions",
        "epoch-keep", "bp-fedavg-keep", "guided"])
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
    assert [r.get("K") for r in rows] == [r.get("K") for r in ref.metrics]
    # the same bytes, the basis included: exactly what each message carried
    assert [r["bytes_down_per_client"] for r in rows] == \
        [r["bytes_down_per_client"] for r in ref.metrics]
    if "guide-dims" in overrides:
        plain = rows[0]["bytes_down_per_client"]
        assert [i for i, r in enumerate(rows) if r["bytes_down_per_client"] > plain] == [2, 4]
    a, b = _model(tmp_path / "flower"), _model(tmp_path / "ref")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert rows[-1]["test_top1"] == pytest.approx(ref.metrics[-1]["test_top1"])
    if overrides.get("client-optimizer") == "keep" and "method" not in overrides:
        assert _steps(tmp_path / "flower") == {c: 2 * 3 for c in range(3)}


def _steps(run_dir):
    """Client -> local steps its kept optimizer state (the server's copy) has taken."""
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False)["server"]["client_optim"]
    return {c: int(s["state"][0]["step"]) for c, s in kept.items()}


def test_kept_optimizers_survive_a_restarted_node_and_a_false_claim(tmp_path):
    """Node 1 loses its kept states before round 1: it starts that epoch fresh, says so,
    and the server replays it fresh. Node 2 names a start state nobody holds in round 1:
    rejected; in round 2 it starts from the state the server still holds (it keeps two)."""
    overrides = {"clients": 3, "K": 4, "rounds": 3, "mode": "epoch", "local-steps": 2,
                 "seed-sharing": "client", "client-optimizer": "keep", "min-clients": 1}
    args = [sys.executable, str(SIM), str(tmp_path), "3", json.dumps(overrides), "keep-faults"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["accepted"] for x in rows] == [3, 2, 3]
    (why,) = rows[1]["rejections"]
    assert why["client"] == 2 and "cannot replay" in why["reason"], why
    assert "does not hold (restarted?)" in r.stdout + r.stderr
    assert _steps(tmp_path) == {0: 6, 1: 4, 2: 4}


GUIDED = {"clients": 2, "K": 4, "guide-dims": 2, "guide-history": 3, "guide-refresh": 3,
          "guide-images": 64, "seed-sharing": "client", "min-clients": 1}


def _basis_bytes(overrides):
    from baffle.simulator import setup

    fed = setup(from_dict({k.replace("-", "_"): v for k, v in overrides.items()}))
    return 4 * fed.n_params * overrides["guide-dims"], 4 * fed.n_params + 8


def test_a_node_that_lost_the_basis_is_refused_once_and_sent_it_again(tmp_path):
    """Rounds 0-5, one basis (round 3). Node 1 loses it before round 4: its reply is an
    error naming the basis, the round goes on with node 0, and round 5 sends the basis to
    node 1 alone (the mean download over the two senders is half a basis above plain)."""
    overrides = {**GUIDED, "rounds": 6}
    args = [sys.executable, str(SIM), str(tmp_path), "2", json.dumps(overrides), "guide-faults"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["accepted"] for x in rows] == [2, 2, 2, 2, 1, 2]
    (why,) = rows[4]["rejections"]
    assert why["client"] == "client 1" and "does not hold the server's basis" in why["reason"]
    basis, plain = _basis_bytes(overrides)
    assert [x["bytes_down_per_client"] for x in rows] == \
        [plain, plain, plain, plain + basis, plain, plain + basis // 2]


def test_a_resumed_flower_server_resends_the_basis_and_trains_on(tmp_path):
    """A server stopped after round 3 (its basis sent) and resumed by a new Flower run: new
    nodes hold nothing, so round 4 sends the basis to both; the model is the
    uninterrupted in-process run's."""
    for rounds, resume in ((4, False), (6, True)):
        overrides = {**GUIDED, "rounds": rounds, "resume": resume}
        _simulate(tmp_path / "flower", 2, overrides)
    rows = [json.loads(x) for x in (tmp_path / "flower" / "metrics.jsonl").read_text()
            .splitlines()]
    basis, plain = _basis_bytes(GUIDED)
    assert [x["round"] for x in rows] == list(range(6))
    assert [x["bytes_down_per_client"] for x in rows] == \
        [plain, plain, plain, plain + basis, plain + basis, plain]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = from_dict({k.replace("-", "_"): v for k, v in GUIDED.items()}).replace(rounds=6)
        ref = train(cfg, run_dir=tmp_path / "ref")
    finally:
        torch.set_num_threads(threads)
    a, b = _model(tmp_path / "flower"), _model(tmp_path / "ref")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
    assert rows[-1]["test_top1"] == pytest.approx(ref.metrics[-1]["test_top1"])


def test_kept_states_round_trip_and_the_start_is_the_one_the_server_names():
    from baffle.client import optimizer_digest
    from baffle.flower.client_app import pick_start
    from baffle.flower.wire import record_states, states_record

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    states = []
    for _ in range(2):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        states.append(copy.deepcopy(opt.state_dict()))
    back = record_states(states_record(states))
    assert [optimizer_digest(s) for s in back] == [optimizer_digest(s) for s in states]
    assert optimizer_digest(states[0]) != optimizer_digest(states[1])
    assert optimizer_digest(None) == 0 and record_states(None) == []
    assert pick_start(back, None, 0) is back[-1]  # the server names none: the newest
    assert pick_start(back, optimizer_digest(states[0]), 0) is back[0]
    assert pick_start(back, 0, 0) is None  # the server replays fresh
    assert pick_start(back, 12345, 0) is None  # a state this node does not hold


def test_a_node_state_file_is_per_experiment_and_a_bad_one_starts_fresh(tmp_path, caplog):
    from flwr.app import Context, RecordDict

    from baffle.client import optimizer_digest
    from baffle.flower.client_app import load_kept, save_kept, state_file

    cfg = from_dict({"mode": "epoch", "client_optimizer": "keep", "seed_sharing": "client"})
    node = {"partition-id": 1, "state-dir": str(tmp_path)}
    path = state_file(node, cfg, 1)
    # longer, rescheduled or moved: the same experiment, the same file; another seed: another
    for same in (cfg.replace(rounds=9), cfg.replace(epochs=3, lr_milestones=(2,)),
                 cfg.replace(data_dir="/elsewhere", device="cuda")):
        assert state_file(node, same, 1) == path
    assert state_file(node, cfg.replace(seed=1), 1) != path
    assert state_file(node, cfg, 0) != path
    assert state_file({"partition-id": 1}, cfg, 1) is None

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()

    def context():
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    save_kept(context(), path, [opt.state_dict()])
    back = load_kept(context(), path, 1)  # a new run: empty Context.state, the file remains
    assert [optimizer_digest(s) for s in back] == [optimizer_digest(opt.state_dict())]
    path.write_bytes(b"not a torch file")
    assert load_kept(context(), path, 1) == []
    assert "cannot read kept optimizer states" in caplog.text


def test_faulty_clients_are_dropped_and_too_few_leave_the_model(tmp_path):
    base = {"clients": 6, "K": 5, "rounds": 2, "min-clients": 2}
    rows = _simulate(tmp_path / "a", 6, base, faulty=True)
    for r in rows:
        assert r["accepted"] == 2 and r["rejected"] == 4 and "note" not in r
        reasons = " | ".join(x["reason"] for x in r["rejections"])
        for fragment in ("lost power", "wrong length", "non-finite", "version"):
            assert fragment in reasons, reasons
        assert "\n" not in reasons and "Traceback" not in reasons  # one line per client
    start = from_dict({"clients": 6})
    from baffle.simulator import setup

    init = setup(start).server.model.state_dict()
    moved = _model(tmp_path / "a")
    assert any(not torch.equal(init[k], moved[k]) for k in init)

    rows = _simulate(tmp_path / "b", 6, {**base, "min-clients": 3}, faulty=True)
    assert all("fewer than min_clients=3: model unchanged" in r["note"] for r in rows)
    kept = _model(tmp_path / "b")
    assert all(torch.equal(init[k], kept[k]) for k in init)


def test_a_clientapp_process_computes_its_upload_without_the_slow_imports():
    """A deployed node starts a fresh ClientApp process for every message: its setup and
    round must not import torch._dynamo (the server's optimizer, never stepped on a node),
    scikit-learn (digits ship as a CSV file) or sympy (meta-device model building)."""
    code = (
        "import json, sys\n"
        "from baffle.flower.client_app import _federation\n"
        "from baffle.simulator import client_round\n"
        "fed = _federation(json.dumps({'dataset': 'digits', 'clients': 2, 'K': 4}))\n"
        "upload, _ = client_round(fed, 1, 0, 0.03, 7, None)\n"
        "assert len(upload.diffs) == 4 and bool(upload.diffs.isfinite().all())\n"
        "print(*[m for m in ('torch._dynamo', 'sklearn', 'sympy') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == []


def test_a_node_builds_no_ema_shadow_or_guide_state_and_computes_the_same_upload():
    from baffle.flower.client_app import _federation
    from baffle.simulator import client_round, setup

    values = {"dataset": "digits", "clients": 2, "K": 4, "ema": True, "guide-dims": 2,
              "guide-history": 3, "guide-images": 64}
    node = _federation(json.dumps(values))
    server = setup(from_dict({k.replace("-", "_"): v for k, v in values.items()}))
    assert server.server.ema is not None and server.server.guide is not None  # as built
    assert node.server.ema is None and node.server.guide is None and node.public is None
    a, _ = client_round(node, 1, 0, 0.03, 7, None)
    b, _ = client_round(server, 1, 0, 0.03, 7, None)
    assert torch.equal(a.diffs, b.diffs)


def test_a_node_without_a_valid_partition_id_gets_one_line_saying_so():
    from baffle.errors import ConfigError
    from baffle.flower.client_app import node_client

    assert node_client({"partition-id": 2}, 3) == 2
    with pytest.raises(ConfigError, match="outside this run's 3 clients"):
        node_client({"partition-id": 3}, 3)
    with pytest.raises(ConfigError, match="no partition-id"):
        node_client({}, 3)
