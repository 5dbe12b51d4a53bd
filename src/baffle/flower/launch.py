"""Start a Flower SuperLink and N SuperNodes on 127.0.0.1 (insecure or TLS), and stop them.

A local deployment for trying, testing and measuring the BAFFLE Flower app; every
server binds to 127.0.0.1 only. SuperNode ``i`` gets ``--node-config "partition-id=i
num-partitions=N"``, so it trains client ``i`` of the seeded split (plus
``state-dir='STATE/node-i'`` with ``--state-dir STATE``: where a node keeps its local
optimizer states for ``client-optimizer = "keep"`` across restarts). The CLI connection
(``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``) is written into ``DIR/home``.

    python -m baffle.flower.launch up  --dir /tmp/flwr --supernodes 2 --certs /tmp/certs
    python -m baffle.flower.launch run --dir /tmp/flwr --supernodes 2 --certs /tmp/certs \\
        --run-config "K=10 rounds=3 run-dir='/tmp/flwr/run'"

``up`` keeps them running until Ctrl-C; ``run`` submits ``flower-app`` with ``flwr run``,
waits for the run to finish, prints its status and the ServerApp's ``baffle-summary``
line, stops everything, and exits 0 only if the run completed. ``--simulation`` starts a
simulation-mode SuperLink instead (virtual SuperNodes, ``num-supernodes``); ``--certs``
takes the folder written by ``scripts/flower-certs.sh`` and switches TLS on.
``--secure-aggregation`` runs a copy of the app (in ``DIR/secagg-app``) whose components
are the SecAgg+ apps of ``baffle.flower.secagg``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import baffle

HOST = "127.0.0.1"
CONNECTION = "baffle"
# Environment for every Flower and Ray process: no telemetry, no update checks, no
# dependency installs at run time, and Ray on the loopback address.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
DEFAULT_APP = Path(baffle.__file__).resolve().parents[2] / "flower-app"


def secure_app(app: str | Path, dest: str | Path) -> Path:
    """A copy of the Flower app folder ``app`` in ``dest`` whose components are the SecAgg+
    apps (``baffle.flower.secagg``) and whose run config also lists their keys, at their
    defaults (Flower only overrides keys the app lists)."""
    from baffle.flower.secagg import SECAGG_DEFAULTS

    src, out = Path(app), Path(dest)
    text = (src / "pyproject.toml").read_text()
    swaps = {'"baffle.flower.server_app:app"': '"baffle.flower.secagg:server_app"',
             '"baffle.flower.client_app:app"': '"baffle.flower.secagg:client_app"'}
    header = "[tool.flwr.app.config]\n"
    if header not in text or not all(k in text for k in swaps):
        raise ValueError(f"{src / 'pyproject.toml'} is not a baffle Flower app: it needs the "
                         f"components {', '.join(swaps)} and a {header.strip()} table")
    for plain, secure in swaps.items():
        text = text.replace(plain, secure)
    extra = "".join(f"{k} = {v!r}\n" for k, v in SECAGG_DEFAULTS.items())
    text = text.replace(header, header + "# SecAgg+ (0: default)\n" + extra, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text(text)
    return out


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def toml_args(values: dict[str, Any]) -> str:
    """``{"K": 10, "run-dir": "/x"}`` -> ``K=10 run-dir="/x"`` (``--run-config`` syntax)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))  # a TOML basic string

    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def _bin(name: str) -> str:
    """A console script of this interpreter's environment, else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install baffle with the flower extra")
    return found


# -- processes -------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids[ppid].append(int(d.name))
    return kids


def process_tree(roots: Iterable[int]) -> list[int]:
    """The pids of ``roots`` and all their descendants (Linux ``/proc``)."""
    kids, out, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def listening_sockets(pids: Iterable[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A" or f[9] not in owner:  # 0A: LISTEN
                continue
            addr_hex, port_hex = f[1].split(":")
            raw = bytes.fromhex(addr_hex)
            # /proc/net lists addresses as host-order 32-bit words
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            addr = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
            found.append((owner[f[9]], addr, int(port_hex, 16)))
    return found


class ByteCounter:
    """A TCP relay on 127.0.0.1 that forwards to ``target`` and counts the bytes each
    way (TLS records, HTTP framing and all): what a SuperNode really sends and gets."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.up, self.down = target, 0, 0
        self._lock = threading.Lock()
        self._server = socket.create_server((HOST, 0))
        self.port = int(self._server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for a, b, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(a, b, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()  # each socket is the source of exactly one pump

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self._server.close()


# -- the deployment --------------------------------------------------------------------

class LocalFlower:
    """One SuperLink and ``supernodes`` SuperNodes on 127.0.0.1, as a context manager.

    ``certs``: a folder from ``scripts/flower-certs.sh`` (ca.crt, server.pem, server.key)
    turns TLS on for the Fleet, Control and Runtime APIs and the SuperNodes' own
    Runtime APIs. ``simulation``: a simulation-mode SuperLink, no SuperNode processes.
    ``count_bytes``: each SuperNode reaches the SuperLink through a ``ByteCounter``.
    ``state_dir``: SuperNode ``i`` keeps its client optimizer states in ``state_dir/node-i``.
    Logs go to ``workdir``; the CLI connection ``baffle`` to ``workdir/home/config.toml``.
    """

    def __init__(self, workdir: str | Path, supernodes: int = 2, certs: str | Path | None = None,
                 simulation: bool = False, count_bytes: bool = False,
                 state_dir: str | Path | None = None) -> None:
        self.dir = Path(workdir).resolve()
        self.state_dir = Path(state_dir).resolve() if state_dir else None
        self.n, self.simulation, self.count_bytes = supernodes, simulation, count_bytes
        self.certs = Path(certs).resolve() if certs else None
        self.port = 0
        self.superlink: subprocess.Popen[bytes] | None = None
        self.nodes: list[subprocess.Popen[bytes] | None] = []
        self.counters: list[ByteCounter] = []
        self._logs: list[Any] = []
        self.env = self._environment()

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_")}
        env.update(FLOWER_ENV, FLWR_HOME=str(self.dir / "home"))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        src = Path(baffle.__file__).resolve().parents[1]  # the folder holding `baffle`
        if src.name != "site-packages":
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(src), env.get("PYTHONPATH", "")) if p)
        return env

    @property
    def tls(self) -> bool:
        return self.certs is not None

    def _server_tls(self) -> list[str]:
        """A server's TLS flags (SuperLink; SuperNode Runtime API), or nothing."""
        if self.certs is None:
            return []
        c = self.certs
        return ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.pem"),
                "--ssl-keyfile", str(c / "server.key")]

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=self.dir, start_new_session=True)

    # -- start ---------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> LocalFlower:
        """Start the SuperLink, wait for its health endpoint, start the SuperNodes and wait
        until all are online. Stops whatever it started if anything fails."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_superlink(timeout)
            self._write_connection()
            if not self.simulation:
                for i in range(self.n):
                    self.nodes.append(self._start_supernode(i))
                self.wait_nodes(self.n, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_superlink(self, timeout: float) -> None:
        self.port = free_port()
        args = [_bin("flower-superlink"), *(self._server_tls() or ["--insecure"]),
                "--host", HOST, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.simulation:
            args.append("--simulation")
        self.superlink = self._spawn("superlink", args)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited ({self.superlink.returncode}); "
                                   f"see {self.dir / 'superlink.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"SuperLink not healthy after {timeout:.0f}s; "
                                   f"see {self.dir / 'superlink.log'}")
            time.sleep(0.5)

    def _healthy(self) -> bool:
        scheme = "https" if self.tls else "http"
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.crt")) if self.certs else None
        try:
            with urllib.request.urlopen(f"{scheme}://{HOST}:{self.port}/health", timeout=2,
                                        context=ctx) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def _write_connection(self) -> None:
        home = self.dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        security = (f'root-certificates = "{self.certs / "ca.crt"}"' if self.certs
                    else "insecure = true")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.port}"\n{security}\n')

    def node_config(self, i: int) -> str:
        """SuperNode ``i``'s ``--node-config``."""
        extra = f" state-dir='{self.state_dir / f'node-{i}'}'" if self.state_dir else ""
        return f"partition-id={i} num-partitions={self.n}{extra}"

    def _start_supernode(self, i: int) -> subprocess.Popen[bytes]:
        port = self.port
        if self.count_bytes:  # one counter per node index; a restarted node reuses its own
            if i == len(self.counters):
                self.counters.append(ByteCounter((HOST, self.port)))
            port = self.counters[i].port
        root = ["--root-certificates", str(self.certs / "ca.crt")] if self.certs else []
        args = [_bin("flower-supernode"), *(root or ["--insecure"]),
                "--superlink", f"{HOST}:{port}", "--host", HOST, "--port", str(free_port()),
                "--node-config", self.node_config(i)]
        args += self._server_tls()  # its own Runtime API (for its ClientApp) on TLS too
        return self._spawn(f"supernode-{i}", args)

    # -- the flwr CLI ----------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Run the ``flwr`` CLI against this deployment; its stdout (raises on failure)."""
        p = subprocess.run([_bin("flwr"), *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout, cwd=self.dir, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({p.returncode}):\n"
                               f"{p.stdout}\n{p.stderr}")
        return p.stdout

    def _json(self, *args: str) -> dict[str, Any]:
        out = self.flwr(*args, CONNECTION, "--format", "json")
        data: dict[str, Any] = json.loads(out[out.index("{"):])
        if not data.get("success"):
            raise RuntimeError(f"flwr {' '.join(args)}: {data}")
        return data

    def online_nodes(self) -> int:
        return sum(n["status"] == "online" for n in self._json("supernode", "ls")["nodes"])

    def wait_nodes(self, n: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while (online := self.online_nodes()) < n:
            for i, p in enumerate(self.nodes):
                if p is not None and p.poll() is not None:
                    raise RuntimeError(f"SuperNode {i} exited ({p.returncode}); "
                                       f"see {self.dir / f'supernode-{i}.log'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{online} of {n} SuperNodes online after {timeout:.0f}s")
            time.sleep(1)

    def submit(self, app: str | Path = DEFAULT_APP, run_config: dict[str, Any] | str = "",
               federation_config: dict[str, Any] | str = "") -> int:
        """``flwr run`` the app; returns the run id (the run goes on in the background)."""
        args = ["run", str(app)]
        for flag, cfg in (("--run-config", run_config), ("--federation-config", federation_config)):
            text = toml_args(cfg) if isinstance(cfg, dict) else cfg
            if text:
                args += [flag, text]
        if self.simulation and not federation_config:
            args += ["--federation-config",
                     toml_args({"num-supernodes": self.n, "client-resources-num-cpus": 1})]
        return int(self._json(*args)["run-id"])

    def status(self, run_id: int) -> dict[str, Any]:
        """The run as ``flwr ls --run-id`` reports it (status, network-traffic, ...)."""
        runs: list[dict[str, Any]] = self._json("ls", "--run-id", str(run_id))["runs"]
        return runs[0]

    def wait(self, run_id: int, timeout: float = 600.0) -> dict[str, Any]:
        """Poll until the run is ``finished:*``; its final status. Each poll is a ``flwr``
        process (about a CPU-second), so the pause grows from 1 s to 8 s: a long run's
        poller takes little CPU from the nodes it is timing."""
        deadline, pause = time.monotonic() + timeout, 1.0
        while not (st := self.status(run_id))["status"].startswith("finished"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {st['status']} after {timeout:.0f}s")
            time.sleep(min(pause, max(0.0, deadline - time.monotonic()) + 0.1))
            pause = min(8.0, 1.5 * pause)
        return st

    def logs(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show")

    # -- stop ------------------------------------------------------------------------------
    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to SuperNode ``i`` and every process it started (a machine dying)."""
        p = self.nodes[i]
        if p is not None:
            _signal(process_tree([p.pid]), sig)
            p.wait(timeout=30)

    def restart_node(self, i: int) -> None:
        """SIGKILL SuperNode ``i`` (and everything it started), then start it again with
        the same node config: a machine that crashed and came back. It registers as a new
        node; its ``Context.state`` starts empty."""
        self.kill_node(i)
        self.nodes[i] = self._start_supernode(i)

    def pids(self) -> list[int]:
        """Every live process this deployment started, with their descendants."""
        roots = [p.pid for p in [self.superlink, *self.nodes] if p is not None and p.poll() is None]
        return [pid for pid in process_tree(roots) if _alive(pid)]

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the SuperNodes, then the SuperLink; SIGKILL whatever outlives ``grace``
        (their SuperExecs, ServerApp/ClientApp and Ray processes included)."""
        tree = set(self.pids())
        for group in ([p for p in self.nodes if p is not None], [self.superlink]):
            live = [p for p in group if p is not None and p.poll() is None]
            _signal([p.pid for p in live], signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in live:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        deadline = time.monotonic() + 5
        while (left := [pid for pid in tree if _alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.2)  # SuperExecs exit on their own once their parent is gone
        _signal(left, signal.SIGKILL)
        deadline = time.monotonic() + 10  # a kill lands asynchronously: wait for it to land
        while [pid for pid in left if _alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in [self.superlink, *self.nodes]:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        for c in self.counters:
            c.close()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LocalFlower:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- command line ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m baffle.flower.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("up", "run"),
                    help="up: start and wait for Ctrl-C; run: start, flwr run, wait, stop")
    ap.add_argument("--dir", required=True, help="work folder: logs and FLWR_HOME (DIR/home)")
    ap.add_argument("--supernodes", type=int, default=2, help="SuperNodes (virtual ones with "
                    "--simulation); the run config's `clients` should match")
    ap.add_argument("--certs", help="folder from scripts/flower-certs.sh: TLS on (default off)")
    ap.add_argument("--simulation", action="store_true",
                    help="a simulation-mode SuperLink: virtual SuperNodes, no processes")
    ap.add_argument("--app", default=str(DEFAULT_APP), help="the Flower app folder (run)")
    ap.add_argument("--run-config", default="", help="run-config overrides, e.g. \"K=10 "
                    "rounds=3 run-dir='/abs/path'\" (run)")
    ap.add_argument("--federation-config", default="", help="simulation only, e.g. "
                    "\"num-supernodes=2 client-resources-num-cpus=1\" (run)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the run")
    ap.add_argument("--count-bytes", action="store_true",
                    help="relay each SuperNode through a byte counter and print the totals")
    ap.add_argument("--secure-aggregation", action="store_true",
                    help="run the app's SecAgg+ variant (baffle.flower.secagg; run-config "
                    "secagg-shares, secagg-threshold, secagg-clip; FedSGD, one seed per round)")
    ap.add_argument("--state-dir", help="SuperNode i keeps its local optimizer states "
                    "(client-optimizer keep) in STATE_DIR/node-i, across restarts")
    a = ap.parse_args(argv)
    if a.simulation and a.count_bytes:
        ap.error("--count-bytes needs SuperNode processes (not --simulation)")

    def interrupt(*_: object) -> None:  # on SIGTERM too: `with` stops every process,
        for sig in (signal.SIGINT, signal.SIGTERM):  # and a second signal can't cut that short
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        return _main(a)
    except KeyboardInterrupt:
        return 130


def _main(a: argparse.Namespace) -> int:
    if a.secure_aggregation:
        a.app = str(secure_app(a.app, Path(a.dir) / "secagg-app"))
    with LocalFlower(a.dir, a.supernodes, a.certs, a.simulation, a.count_bytes,
                     a.state_dir) as fl:
        where = f"{'https' if fl.tls else 'http'}://{HOST}:{fl.port}"
        kind = "virtual SuperNodes" if a.simulation else "SuperNodes"
        print(f"SuperLink {where} ({'simulation, ' if a.simulation else ''}"
              f"{'TLS' if fl.tls else 'insecure'}), {a.supernodes} {kind}; logs in {fl.dir}",
              flush=True)
        if a.command == "up":
            print(f"export FLWR_HOME={fl.dir / 'home'}\n"
                  f"flwr run {a.app} {CONNECTION}  # Ctrl-C here stops everything", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                return 0
        run_id = fl.submit(a.app, a.run_config, a.federation_config)
        print(f"run {run_id} submitted", flush=True)
        st = fl.wait(run_id, a.timeout)
        log = fl.logs(run_id).splitlines()
        summary = [line for line in log if "baffle-summary:" in line]
        print(f"run {run_id}: {st['status']} in {st['elapsed']:.1f}s, Flower network traffic "
              f"{st['network-traffic']}")
        print(summary[-1] if summary else "no baffle-summary line in the run's log; its end:\n"
              + "\n".join(log[-15:]))
        for i, c in enumerate(fl.counters):
            up, down = c.counts()
            print(f"SuperNode {i}: {up} bytes up, {down} bytes down (TCP payload)")
        return 0 if st["status"] == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main())
