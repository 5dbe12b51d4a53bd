"""BAFFLE on a real Flower deployment: a SuperLink and SuperNodes on 127.0.0.1, driven by
the ``flwr`` CLI exactly as flower-app/README.md does it.

- TLS on, 2 SuperNodes, ``flwr run``: the run completes, both clients are accepted every
  round, and the numbers equal the in-process simulator's.
- A SuperNode SIGKILLed after the first round does not kill the run: the next round
  logs it as a rejection and trains on the survivor. One restarted with a ``state-dir``
  carries its kept optimizer on.
- ``flwr run`` on a simulation-mode SuperLink (virtual SuperNodes on Ray).
Each test starts its own processes and stops all of them, descendants included; every
socket they listen on must be on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower-app"
CERTS_SH = ROOT / "scripts" / "flower-certs.sh"

needs_flower = pytest.mark.skipif(
    importlib.util.find_spec("flwr") is None or not sys.platform.startswith("linux"),
    reason="needs flwr (pip install -e '.[flower]') and Linux /proc")


def app_config() -> dict:
    return tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_app_config_lists_every_train_config_field_and_parses():
    """Only keys in [tool.flwr.app.config] can be overridden by ``flwr run --run-config``."""
    pytest.importorskip("flwr")
    from baffle.config import TrainConfig
    from baffle.errors import ConfigError
    from baffle.flower.wire import FLOWER_KEYS, config_from_run_config

    cfg = app_config()
    want = {f.name.replace("_", "-") for f in fields(TrainConfig)} | set(FLOWER_KEYS)
    assert set(cfg) == want
    train_cfg, flower = config_from_run_config(cfg)
    assert (train_cfg.dataset, train_cfg.clients, train_cfg.rounds) == ("digits", 2, 3)
    assert flower == {"run-dir": "", "resume": False, "round-timeout": 600.0}
    # the kept client optimizer runs on Flower too (tests/test_flower_sim.py)
    kept, _ = config_from_run_config({**cfg, "mode": "epoch", "client-optimizer": "keep"})
    assert kept.client_optimizer == "keep"
    with pytest.raises(ConfigError, match="applies to local epochs"):
        config_from_run_config({**cfg, "client-optimizer": "keep"})  # fedsgd: refused
    cycled, _ = config_from_run_config({**cfg, "perturb": "layer", "layer-cycle": "0,1,1,2"})
    assert cycled.layer_cycle == (0, 1, 1, 2)
    per_round, _ = config_from_run_config({**cfg, "ema-every": "round"})
    assert per_round.ema_every == "round"
    guided, _ = config_from_run_config({**cfg, "guide-dims": 50})  # sent by the strategy
    assert guided.guide_dims == 50
    with pytest.raises(ConfigError, match="--guide-history 100 holds too few"):
        config_from_run_config({**cfg, "guide-dims": 101})


# -- helpers ---------------------------------------------------------------------------

def rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def wait_watching(fl, run_id: int, timeout: float) -> tuple[dict, set]:
    """Wait for the run while recording every (address, port) its processes listen on."""
    from baffle.flower.launch import listening_sockets

    seen: set = set()
    deadline = time.monotonic() + timeout
    while True:
        seen |= {(a, p) for _, a, p in listening_sockets(fl.pids())}
        st = fl.status(run_id)
        if st["status"].startswith("finished"):
            return st, seen
        assert time.monotonic() < deadline, f"run still {st['status']} after {timeout}s"
        time.sleep(1)


def assert_loopback_only(seen: set) -> None:
    """Every listener on 127.0.0.1 (Ray's dual-stack sockets show it as ::ffff:127.0.0.1)."""
    assert seen, "found no listening sockets at all"
    assert {a.removeprefix("::ffff:") for a, _ in seen} == {"127.0.0.1"}, sorted(seen)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(CERTS_SH), str(d)], check=True, capture_output=True)
    return d


@pytest.fixture
def deployment(tmp_path, certs):
    """A TLS SuperLink and two SuperNodes; stopped (every descendant too) afterwards."""
    from baffle.flower.launch import LocalFlower, _alive

    fl = LocalFlower(tmp_path / "flower", supernodes=2, certs=certs)
    try:
        fl.start()
        yield fl
    finally:
        started = fl.pids()
        fl.stop()
        assert not [p for p in started if _alive(p)], "processes outlived stop()"


# -- the tests -------------------------------------------------------------------------

@needs_flower
@pytest.mark.slow
def test_tls_deployment_trains_like_the_simulator(deployment, tmp_path):
    from baffle import train
    from baffle.flower.wire import config_from_run_config

    fl = deployment
    plain = f"http://127.0.0.1:{fl.port}/health"  # TLS really is on: plain HTTP is refused
    with pytest.raises(OSError):
        urllib.request.urlopen(plain, timeout=5)

    run_dir = tmp_path / "run"
    overrides = {"K": 10, "rounds": 3, "run-dir": str(run_dir), "round-timeout": 120.0}
    run_id = fl.submit(APP, overrides)
    st, seen = wait_watching(fl, run_id, timeout=240)
    assert st["status"] == "finished:completed", fl.logs(run_id)[-3000:]
    assert_loopback_only(seen)

    summary = json.loads((run_dir / "summary.json").read_text())
    got = rows(run_dir)
    assert summary["rounds"] == 3 and len(got) == 3
    assert [(r["accepted"], r["rejected"]) for r in got] == [(2, 0)] * 3
    assert all(r["bytes_up_per_client"] == 4 * 10 + 8 + 8 for r in got)
    assert "baffle-summary:" in fl.logs(run_id)
    assert st["network-traffic"]["total-bytes"] > 0

    cfg, _ = config_from_run_config({**app_config(), **overrides, "run-dir": ""})
    ref = train(cfg).metrics
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in ref],
                                                           rel=1e-5)
    assert got[-1]["test_top1"] == pytest.approx(ref[-1]["test_top1"], abs=0.3)


@needs_flower
@pytest.mark.slow
def test_deployed_nodes_keep_their_local_optimizers(deployment, tmp_path):
    """Epoch mode with --client-optimizer keep on real SuperNodes: each node's Adam state
    lives in its Context.state from round to round (else the server, told so by the
    digest, would replay 2 fresh steps, not 6), and training matches the simulator."""
    from baffle import train
    from baffle.flower.wire import config_from_run_config

    run_dir = tmp_path / "run"
    overrides = {"K": 4, "rounds": 3, "mode": "epoch", "local-steps": 2,
                 "seed-sharing": "client", "client-optimizer": "keep",
                 "run-dir": str(run_dir), "round-timeout": 120.0}
    run_id = deployment.submit(APP, overrides)
    st = deployment.wait(run_id, timeout=240)
    assert st["status"] == "finished:completed", deployment.logs(run_id)[-3000:]
    got = rows(run_dir)
    assert [(r["accepted"], r["rejected"]) for r in got] == [(2, 0)] * 3
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False)["server"]["client_optim"]
    assert {c: int(s["state"][0]["step"]) for c, s in kept.items()} == {0: 6, 1: 6}
    cfg, _ = config_from_run_config({**app_config(), **overrides, "run-dir": ""})
    ref = train(cfg).metrics
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in ref],
                                                           rel=1e-5)


@needs_flower
@pytest.mark.slow
def test_kept_optimizers_outlive_the_flower_run_on_nodes_with_a_state_dir(tmp_path, certs):
    """Two SuperNodes with ``state-dir``. Run 1 trains 2 rounds; run 2, a new Flower run,
    resumes the server from its checkpoint for 2 more. Every node's Context.state starts
    empty in run 2, so only the nodes' state files carry Adam over: the server's copies
    reach 8 steps (4 rounds x 2), not 4 (fresh from round 3), and the losses equal an
    uninterrupted in-process run of 4 rounds. A third run resuming with another K fails.
    """
    from baffle import train
    from baffle.flower.launch import LocalFlower, _alive
    from baffle.flower.wire import config_from_run_config

    run_dir, state = tmp_path / "run", tmp_path / "state"
    base = {"K": 4, "mode": "epoch", "local-steps": 2, "seed-sharing": "client",
            "client-optimizer": "keep", "run-dir": str(run_dir), "round-timeout": 120.0}
    fl = LocalFlower(tmp_path / "flower", supernodes=2, certs=certs, state_dir=state)
    try:
        fl.start()
        for rounds, resume in ((2, False), (4, True)):
            run_id = fl.submit(APP, {**base, "rounds": rounds, "resume": resume})
            st = fl.wait(run_id, timeout=240)
            assert st["status"] == "finished:completed", fl.logs(run_id)[-3000:]
        # resuming it with another estimator would mix two experiments in one run: refused
        before = (run_dir / "metrics.jsonl").read_text()
        run_id = fl.submit(APP, {**base, "rounds": 6, "resume": True, "K": 8})
        assert fl.wait(run_id, timeout=240)["status"] == "finished:failed"
        assert "resuming with another config may change only" in fl.logs(run_id)
        assert (run_dir / "metrics.jsonl").read_text() == before
    finally:
        started = fl.pids()
        fl.stop()
        assert not [p for p in started if _alive(p)], "processes outlived stop()"
    got = rows(run_dir)
    assert [(r["round"], r["accepted"], r["rejected"]) for r in got] == [
        (r, 2, 0) for r in range(4)]
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False)["server"]["client_optim"]
    assert {c: int(s["state"][0]["step"]) for c, s in kept.items()} == {0: 8, 1: 8}
    files = sorted(p.relative_to(state).parts for p in state.rglob("*.pt"))
    assert [(d, f.split("-")[-1]) for d, f in files] == [("node-0", "client0.pt"),
                                                         ("node-1", "client1.pt")]
    cfg, _ = config_from_run_config({**app_config(), **base, "rounds": 4, "run-dir": ""})
    ref = train(cfg).metrics
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in ref],
                                                           rel=1e-5)


@needs_flower
@pytest.mark.slow
def test_a_supernode_restarted_mid_run_resumes_its_kept_optimizer_from_its_state_dir(
        tmp_path, certs):
    """Epoch mode, kept Adam, 2 SuperNodes with ``state-dir``. After round 0, SuperNode 1
    is SIGKILLed and started again: the server sees a reply go missing, and the node comes
    back as a new node with an empty Context.state. The server replays client 1 from the state it kept, and the node
    starts from the same one only if it read its state file: the server's copy then has 2
    Adam steps for every round client 1 was accepted in (a fresh start would give 2 per
    round since the restart only)."""
    from baffle.flower.launch import LocalFlower, _alive

    run_dir, state = tmp_path / "run", tmp_path / "state"
    overrides = {"K": 4, "rounds": 4, "mode": "epoch", "local-steps": 2,
                 "seed-sharing": "client", "client-optimizer": "keep",
                 "run-dir": str(run_dir), "round-timeout": 40.0}
    fl = LocalFlower(tmp_path / "flower", supernodes=2, certs=certs, state_dir=state)
    try:
        fl.start()
        run_id = fl.submit(APP, overrides)
        deadline = time.monotonic() + 150
        while not rows(run_dir):
            assert time.monotonic() < deadline, "first round never finished"
            time.sleep(0.2)
        fl.restart_node(1)
        st = fl.wait(run_id, timeout=300)
        assert st["status"] == "finished:completed", fl.logs(run_id)[-3000:]
    finally:
        started = fl.pids()
        fl.stop()
        assert not [p for p in started if _alive(p)], "processes outlived stop()"
    got = rows(run_dir)
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    one_in = [r["accepted"] == 2 for r in got]  # client 0 never leaves
    missed = [x for r in got for x in r["rejections"] if x["client"] == "client 1"]
    assert one_in[0] and missed, (one_in, [r["rejections"] for r in got])
    back = sum(one_in[1:])
    assert back, f"the restarted node never came back: {[r['rejections'] for r in got]}"
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False)["server"]["client_optim"]
    steps = {c: int(s["state"][0]["step"]) for c, s in kept.items()}
    assert steps == {0: 8, 1: 2 * (1 + back)}, (steps, one_in)


@needs_flower
@pytest.mark.slow
def test_killed_supernode_does_not_kill_the_run(deployment, tmp_path):
    fl = deployment
    run_dir = tmp_path / "run"
    # the strategy waits for all `clients` nodes only in the first round; later rounds go
    # on with whoever replies within round-timeout
    run_id = fl.submit(APP, {"K": 10, "rounds": 2, "run-dir": str(run_dir),
                             "round-timeout": 40.0})
    deadline = time.monotonic() + 150
    while not rows(run_dir):
        assert time.monotonic() < deadline, "first round never finished"
        time.sleep(0.2)
    fl.kill_node(1)  # SIGKILL the SuperNode, its SuperExec and ClientApp

    st = fl.wait(run_id, timeout=150)
    assert st["status"] == "finished:completed", fl.logs(run_id)[-3000:]
    got = rows(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 2
    assert (got[0]["accepted"], got[0]["rejected"]) == (2, 0)
    assert got[1]["accepted"] == 1  # the survivor trained on
    reasons = [x["reason"] for x in got[1]["rejections"]]
    assert reasons and all("timeout" in r or "unavailable" in r.lower() for r in reasons), reasons
    assert "rejected client" in fl.logs(run_id)


@needs_flower
@pytest.mark.slow
def test_flwr_run_on_the_simulation_engine(tmp_path):
    from baffle.flower.launch import LocalFlower

    run_dir = tmp_path / "run"
    with LocalFlower(tmp_path / "flower", supernodes=2, simulation=True) as fl:
        run_id = fl.submit(APP, {"K": 10, "rounds": 2, "run-dir": str(run_dir)},
                           {"num-supernodes": 2, "client-resources-num-cpus": 1})
        st, seen = wait_watching(fl, run_id, timeout=240)
        started = fl.pids()
    assert st["status"] == "finished:completed"
    assert_loopback_only(seen)  # Ray's GCS, raylet and workers included
    assert [(r["accepted"], r["rejected"]) for r in rows(run_dir)] == [(2, 0)] * 2
    from baffle.flower.launch import _alive
    assert not [p for p in started if _alive(p)]


def test_the_secure_app_is_the_app_with_the_secagg_components_and_keys(tmp_path):
    pytest.importorskip("flwr")
    from baffle.flower.launch import secure_app

    out = secure_app(APP, tmp_path / "app")
    flwr = tomllib.loads((out / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "baffle.flower.secagg:server_app",
                                  "clientapp": "baffle.flower.secagg:client_app"}
    assert flwr["config"] == {**app_config(), "secagg-shares": 0, "secagg-threshold": 0,
                              "secagg-clip": 0.0}


@needs_flower
@pytest.mark.slow
def test_secure_aggregation_deploys_in_one_command_and_trains_like_plaintext(tmp_path):
    """``launch run --secure-aggregation`` with --guide-dims: a SuperLink and 3 SuperNodes
    on 127.0.0.1 run the SecAgg+ apps; the three masked vectors are summed every round,
    the basis reaches each node once (round 2) inside its fit instructions, and the weights
    are plaintext's up to the quantization (sigma 1e-2, as in the simulation's guided test,
    which measures 4-6e-5), far from those of a run that never guides."""
    from baffle import train
    from baffle.flower.wire import config_from_run_config
    from baffle.simulator import setup

    run_dir = tmp_path / "run"
    overrides = {"clients": 3, "K": 10, "rounds": 3, "optimizer": "sgd", "lr": 0.05,
                 "sigma": 1e-2, "guide-dims": 2, "guide-history": 2, "guide-refresh": 2,
                 "guide-images": 100, "run-dir": str(run_dir), "round-timeout": 120.0}
    from baffle.flower.launch import toml_args

    r = subprocess.run([sys.executable, "-m", "baffle.flower.launch", "run", "--dir",
                        str(tmp_path / "flower"), "--supernodes", "3", "--secure-aggregation",
                        "--timeout", "400", "--run-config", toml_args(overrides)],
                       capture_output=True, text=True, timeout=520)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "finished:completed" in r.stdout and "baffle-summary:" in r.stdout
    got = rows(run_dir)
    assert [(x["secagg_clients"], x["accepted"], x["rejected"]) for x in got] == [(3, 1, 0)] * 3

    def reference(values):
        cfg, _ = config_from_run_config({**app_config(), **values, "run-dir": ""})
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the one-thread ClientApp processes ran
        try:
            return cfg, train(cfg, run_dir=tmp_path / f"ref{values['guide-dims']}")
        finally:
            torch.set_num_threads(threads)

    cfg, ref = reference(overrides)
    _, unguided = reference({**overrides, "guide-dims": 0})
    down = [x["bytes_down_per_client"] for x in got]
    assert down == [x["bytes_down_per_client"] for x in ref.metrics]
    basis = 4 * setup(cfg).n_params * 2
    assert down[2] - down[1] == basis
    proto = [x["protocol_bytes_down_per_client"] for x in got]  # the same U in the messages
    assert 0 < proto[2] - proto[1] - basis < 300, (proto, basis)

    w0 = setup(cfg).server.model.state_dict()

    def update(run):
        final = torch.load(run / "checkpoint.pt", weights_only=False)["server"]["model"]
        return torch.cat([(final[k] - w0[k]).flatten() for k in w0])

    d_sec, d_pln, d_ung = update(run_dir), update(ref.run_dir), update(unguided.run_dir)
    assert float((d_sec - d_pln).norm() / d_pln.norm()) < 1e-3
    assert float((d_ung - d_pln).norm() / d_pln.norm()) > 0.1


@pytest.mark.parametrize("clients,shares,threshold,match", [
    (2, 2, 2, "at least 3 clients"), (4, 5, 2, "secagg-shares must be 3..4"),
    (4, 2, 2, "secagg-shares must be 3..4"), (4, 3, 4, "secagg-threshold must be 2..3"),
    (4, 4, 1, "secagg-threshold must be 2..4")])
def test_a_secagg_protocol_flower_would_refuse_gets_one_line(clients, shares, threshold, match):
    pytest.importorskip("flwr")
    from baffle.errors import ConfigError
    from baffle.flower.secagg import check_protocol

    with pytest.raises(ConfigError, match=match) as e:
        check_protocol(clients, shares, threshold)
    assert "\n" not in str(e.value)
    check_protocol(4, 3, 2)  # and a valid one passes


def test_secagg_run_config_defaults_and_bad_values():
    pytest.importorskip("flwr")
    from baffle.errors import ConfigError
    from baffle.flower.secagg import protocol_settings

    assert protocol_settings({}, 4) == (4, 3, 0.0)  # all shares, 2/3 of them, calibrate
    assert protocol_settings({"secagg-shares": 0, "secagg-threshold": 0, "secagg-clip": 0.0},
                             7) == (7, 5, 0.0)
    assert protocol_settings({"secagg-shares": 5, "secagg-clip": 2.5}, 9) == (5, 4, 2.5)
    for bad, match in (({"secagg-clip": -1.0}, "secagg-clip must be >= 0"),
                       ({"secagg-shares": "many"}, "must be integers"),
                       ({"secagg-shares": 2}, "secagg-shares must be 3..4")):
        with pytest.raises(ConfigError, match=match) as e:
            protocol_settings(bad, 4)
        assert "\n" not in str(e.value)
