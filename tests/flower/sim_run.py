"""Run one Flower simulation (Ray backend) of baffle's apps; used by tests/test_flower_sim.py.

    python tests/flower/sim_run.py RUN_DIR NUM_SUPERNODES JSON_OVERRIDES \
        [faulty|secagg|secagg-dropout|secagg-guide-faults|keep-faults|guide-faults]

With ``faulty``: client 1 raises, 2 uploads a short vector, 3 a NaN, 4 runs another
direction-scheme version; the others behave. ``secagg`` runs the SecAgg+ apps; with
``secagg-dropout`` client 1 dies after the key exchange, mid-protocol; with
``secagg-guide-faults`` node 1 loses its --guide-dims basis before round 4. Every client's
plaintext K-vector is appended to RUN_DIR/../plain.jsonl so tests can measure the
aggregate's error (a test-only leak, of course). ``keep-faults`` (kept client
optimizers): see ``keep_faults``; ``guide-faults`` (--guide-dims): see ``guide_faults``.
"""

import dataclasses
import json
import os
import sys
import tempfile

os.environ.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
                  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", RAY_USAGE_STATS_ENABLED="0",
                  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", FLWR_HOME=tempfile.mkdtemp())

from flwr.simulation import run_simulation  # noqa: E402

from baffle.aggregate import Upload  # noqa: E402
from baffle.directions import DirectionScheme  # noqa: E402
from baffle.flower.client_app import make_client_app  # noqa: E402
from baffle.flower.server_app import make_server_app  # noqa: E402


def tamper(client: int, u: Upload) -> Upload:
    if client == 1:
        raise RuntimeError("client 1 lost power")
    if client == 2:
        return Upload(u.client, u.num_examples, u.seeds, u.diffs[:-1], loss=u.loss)
    if client == 3:
        return Upload(u.client, u.num_examples, u.seeds, u.diffs * float("nan"), loss=u.loss)
    return u




def keep_faults(overrides):
    """In round 1 node 1 loses its kept optimizer states (as a restarted node would) and
    node 2 names, in its upload, a start state nobody holds."""
    from flwr.clientapp import ClientApp

    from baffle.flower.client_app import STATE_KEY

    def bogus(client: int, u: Upload) -> Upload:
        return dataclasses.replace(u, optim_base=12345) if client == 2 else u

    good, liar = make_client_app(overrides), make_client_app(overrides, tamper=bogus)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        node, r = int(context.node_config["partition-id"]), int(msg.content["config"]["round"])
        if r == 1 and node == 1 and STATE_KEY in context.state:
            del context.state[STATE_KEY]
        return (liar if r == 1 else good)(msg, context)

    return app


def guide_faults(overrides):
    """In round 4 node 1 has lost the basis it was sent (as a restarted node would)."""
    from flwr.clientapp import ClientApp

    from baffle.flower.wire import BASIS_KEY

    inner = make_client_app(overrides)
    app = ClientApp()

    @app.train()
    def train(msg, context):
        node, r = int(context.node_config["partition-id"]), int(msg.content["config"]["round"])
        if r == 4 and node == 1 and BASIS_KEY in context.state:
            del context.state[BASIS_KEY]
        return inner(msg, context)

    return app


def forget_basis_mod(msg, context, call_next):
    """``secagg-guide-faults``: node 1 loses its basis (as a restarted node would) just
    before its round-4 fit, the SecAgg+ stage that carries the weights."""
    from baffle.flower.wire import BASIS_KEY

    fit = msg.content.config_records.get("fitins.config")
    if (fit is not None and int(fit["round"]) == 4
            and int(context.node_config["partition-id"]) == 1 and BASIS_KEY in context.state):
        del context.state[BASIS_KEY]
    return call_next(msg, context)


def record_plain(run_dir: str, drop: bool):
    def tamper(client: int, u: Upload) -> Upload:
        if drop and client == 1:
            raise RuntimeError("client 1 dropped out mid-protocol")
        with open(os.path.join(os.path.dirname(run_dir), "plain.jsonl"), "a") as f:
            f.write(json.dumps({"client": client, "seed": u.seeds[0], "n": u.num_examples,
                                "d": u.diffs.tolist()}) + "\n")
        return u
    return tamper


def main() -> None:
    run_dir, n, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else ""
    faulty = mode == "faulty"
    overrides["run-dir"] = run_dir
    if mode.startswith("secagg"):
        from baffle.flower.secagg import make_secagg_client_app, make_secagg_server_app

        recorder = record_plain(run_dir, mode == "secagg-dropout")
        mods = [forget_basis_mod] if mode == "secagg-guide-faults" else []
        run_simulation(server_app=make_secagg_server_app(overrides),
                       client_app=make_secagg_client_app(overrides, recorder, mods),
                       num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
        return
    if mode in ("keep-faults", "guide-faults"):  # nodes that lose what they kept
        faults = keep_faults if mode == "keep-faults" else guide_faults
        run_simulation(server_app=make_server_app(overrides),
                       client_app=faults(overrides), num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
        return
    client_app = make_client_app(overrides, tamper=tamper if faulty else None)
    if faulty:  # client 4 draws with another scheme version: it must refuse to train
        good = client_app
        bad = make_client_app(overrides, dirs=DirectionScheme(version="baffle-dirs/0"))

        from flwr.clientapp import ClientApp

        client_app = ClientApp()

        @client_app.train()
        def train(msg, context):
            pick = bad if int(context.node_config["partition-id"]) == 4 else good
            return pick(msg, context)

    run_simulation(server_app=make_server_app(overrides), client_app=client_app,
                   num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


if __name__ == "__main__":
    main()
