"""BAFFLE on Flower against the in-process simulator, same work: round time on the
simulation engine and on a loopback deployment (its fixed latency), bytes on the wire
per round per client (TCP payload through a counting relay) against backprop FedAvg,
and final accuracy with and without SecAgg+ on the same seeds.

    python -m benchmarks.run flower
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from baffle import TrainConfig, train
from baffle.flower.launch import DEFAULT_APP, LocalFlower, secure_app
from baffle.rundir import RunDir
from benchmarks.common import ROOT, table, write_section

BASE = {"dataset": "digits", "clients": 2, "rounds": 4, "lr": 0.03}
SIM_RUN = ROOT / "tests" / "flower" / "sim_run.py"
# server-guided directions: a basis U (d x 2) from round 2 on, sent once to each node
GUIDED = {"guide-dims": 2, "guide-history": 2, "guide-refresh": 2, "guide-images": 100}


def per_round(rows: list[dict[str, Any]]) -> float:
    """Median round wall time, first round (start-up) excluded."""
    return statistics.median(r["wall_s"] for r in rows[1:])


def in_process(cfg: dict[str, Any]) -> float:
    res = train(TrainConfig(**{k.replace("-", "_"): v for k, v in cfg.items()}))
    return per_round(res.metrics)


def on_flower(cfg: dict[str, Any], simulation: bool, work: Path,
              app: Path = DEFAULT_APP) -> dict[str, Any]:
    run_dir = work / "run"
    with LocalFlower(work, supernodes=cfg["clients"], simulation=simulation,
                     count_bytes=not simulation) as fl:
        run_id = fl.submit(app, run_config={**cfg, "run-dir": str(run_dir)})
        status = fl.wait(run_id, timeout=900)
        counts = [c.counts() for c in fl.counters]
    if status["status"] != "finished:completed":
        raise RuntimeError(f"Flower run {run_id} ended {status['status']}")
    rows = RunDir(run_dir).metrics()
    out: dict[str, Any] = {"s_per_round": per_round(rows),
                           "payload_up": statistics.mean(r["bytes_up_per_client"] for r in rows),
                           "payload_down": statistics.mean(r["bytes_down_per_client"]
                                                           for r in rows)}
    if all("protocol_bytes_up_per_client" in r for r in rows):  # SecAgg+ rounds
        out["protocol_up"], out["protocol_down"] = (
            statistics.mean(r[f"protocol_bytes_{way}_per_client"] for r in rows)
            for way in ("up", "down"))
    if counts:
        n = len(rows)
        out["tcp_up"] = statistics.mean(u for u, _ in counts) / n
        out["tcp_down"] = statistics.mean(d for _, d in counts) / n
    return out


# SecAgg+ deployed: it needs 3 clients at least
SECURE = {**BASE, "clients": 3, "K": 20, "rounds": 3}


def secagg_deployed(work: Path) -> list[list[str]]:
    """Plain and SecAgg+ rounds (unguided and guided) on one loopback deployment each."""
    app = secure_app(DEFAULT_APP, work / "secagg-app")
    rows = []
    for i, (name, extra, use) in enumerate([("plain", {}, DEFAULT_APP),
                                            ("SecAgg+", {}, app),
                                            ("SecAgg+, guide-dims 2", GUIDED, app)]):
        dep = on_flower({**SECURE, **extra}, simulation=False, work=work / f"sa{i}", app=use)
        protocol = (f"{dep['protocol_up']:,.0f} / {dep['protocol_down']:,.0f}"
                    if "protocol_up" in dep else "-")
        rows.append([name, f"{dep['s_per_round']:.2f}",
                     f"{dep['payload_up']:,.0f} / {dep['payload_down']:,.0f}", protocol,
                     f"{dep['tcp_up']:,.0f} / {dep['tcp_down']:,.0f}"])
    return rows


def secagg_accuracy(work: Path) -> list[list[str]]:
    cfg = {"clients": 4, "K": 50, "rounds": 24, "lr": 0.03}
    run = work / "secagg"
    subprocess.run([sys.executable, str(SIM_RUN), str(run), "4", json.dumps(cfg), "secagg"],
                   check=True, capture_output=True, timeout=1800)
    secure = json.loads((run / "summary.json").read_text())["test_top1"]
    plain = train(TrainConfig(**cfg)).summary["test_top1"]
    errs = [r for r in RunDir(run).metrics()]
    clip = errs[0]["secagg_clip"]
    return [["plaintext (in-process simulator)", f"{plain:.2f}", "-"],
            ["SecAgg+ (Flower simulation)", f"{secure:.2f}",
             f"clip c = {clip:.3g}; max error per entry of the mean <= sigma*2c/2^22 "
             f"= {1e-4 * 2 * clip / 2**22:.2e}"]]


# one deployed message's work on a node, in a fresh interpreter as Flower's SuperNode runs
# it: a new flwr-clientapp process per message (Flower 1.41), importing, setting up, training
PROBE = """
import json, sys, time
t0 = time.perf_counter()
import flwr.clientapp, torch
t1 = time.perf_counter()
from baffle.flower.client_app import _federation
from baffle.simulator import client_round
t2 = time.perf_counter()
fed = _federation(sys.argv[1])
t3 = time.perf_counter()
client_round(fed, 0, 0, 0.03, 7, None)
t4 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1, t3 - t2, t4 - t3]))
"""
MNIST = os.environ.get("BAFFLE_MNIST_DIR", str(ROOT.parent / "shared" / "data" / "mnist"))


# the last commit whose nodes decoded, verified and resized all of MNIST in every process
# (before the decoded-data cache): its ClientApp start is measured beside this tree's
BEFORE = os.environ.get("BAFFLE_START_BEFORE", "b34633d")


def clientapp_start(src: Path, dataset: str, repeats: int = 5) -> list[float]:
    """Median seconds of a fresh ClientApp process's phases, with baffle imported from
    ``src``: torch and Flower imports, baffle's imports, setup (data, split, model), one
    FedSGD round (K=20), and the whole process from spawn to exit (the interpreter's own
    start and exit included)."""
    rc = {"dataset": dataset, "clients": 2, "K": 20, **(
        {"data-dir": MNIST} if dataset == "mnist" else {})}
    env = {**os.environ, "PYTHONPATH": str(src)}
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(rc, sort_keys=True)],
                             capture_output=True, text=True, check=True, timeout=300, env=env)
        runs.append([*json.loads(out.stdout), time.perf_counter() - start])
    return [statistics.median(col) for col in zip(*runs)]


def start_rows(work: Path) -> list[list[str]]:
    """This tree's ClientApp start, then ``BEFORE``'s, in one run, on digits and MNIST."""
    got = subprocess.run(["git", "archive", "--format=tar", BEFORE, "src"], cwd=ROOT,
                         capture_output=True)
    if got.returncode != 0:
        sys.exit(f"flower: cannot read commit {BEFORE} from git (a shallow clone?): fetch "
                 "the history or set BAFFLE_START_BEFORE to a commit this clone has")
    archive = got.stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(work / "before", filter="data")
    rows = []
    for name, dataset in (("digits", "digits"), ("MNIST", "mnist")):
        for label, src in (("this tree", ROOT / "src"), (BEFORE, work / "before" / "src")):
            rows.append([name, label, *(f"{t:.2f}" for t in clientapp_start(src, dataset))])
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        starts = start_rows(Path(tmp))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for i, (method, K, extra) in enumerate([("baffle", 20, {}), ("baffle", 200, {}),
                                                ("baffle", 20, GUIDED), ("bp-fedavg", 20, {})]):
            cfg = {**BASE, "method": method, "K": K, **extra}
            local = in_process(cfg)
            dep = on_flower(cfg, simulation=False, work=work / f"dep{i}")
            sim = on_flower(cfg, simulation=True, work=work / f"sim{i}")
            name = f"{method}, guide-dims {extra['guide-dims']}" if extra else method
            rows.append([name, K if method == "baffle" else "-", f"{local:.2f}",
                         f"{sim['s_per_round']:.2f}", f"{dep['s_per_round']:.2f}",
                         f"{dep['s_per_round'] - local:.1f}",
                         f"{100 * local / dep['s_per_round']:.0f}%",
                         f"{dep['payload_up']:,.0f} / {dep['payload_down']:,.0f}",
                         f"{dep['tcp_up']:,.0f} / {dep['tcp_down']:,.0f}"])
        sec = secagg_accuracy(work)
        secure = secagg_deployed(work)
    body = (
        f"LeNet on digits, {BASE['clients']} clients, {BASE['rounds']} rounds, lr "
        f"{BASE['lr']}; deployment = one SuperLink and {BASE['clients']} SuperNodes on "
        "127.0.0.1 (insecure; TLS measured the same by hand); round times are medians "
        "without the first round. TCP bytes are what crossed each SuperNode's connection per "
        "round (HTTP framing and Flower's idle polling included); payload bytes are the "
        "run's own exact counts (`bytes_up_per_client`, `bytes_down_per_client`), averaged "
        "over its rounds like the TCP bytes. The guided row's server sends its basis U "
        f"(4 d x {GUIDED['guide-dims']} bytes) to each node once, in round "
        f"{GUIDED['guide-refresh']}.\n\n"
        + table(["method", "K", "in-process s/round", "Flower simulation s/round",
                 "deployment s/round", "fixed latency s", "compute share of a deployed round",
                 "payload up / down B per round", "TCP up / down B per round"], rows)
        + "\n\nBAFFLE is worth deploying when the clients' compute, not Flower's fixed "
        "latency, fills the round: the compute share column shows how far K must grow "
        "(client compute scales with K+1 forward passes; the latency does not).\n\n"
        "Part of that latency is ours: Flower 1.41 starts a new `flwr-clientapp` process "
        "for every message, which imports, loads its data and builds the model before it "
        "computes its upload. One such process's phases, seconds (median of 5, one process "
        "at a time, 2 clients, K=20), for this tree and for commit " + BEFORE + ", whose "
        "nodes decoded, verified and resized all 70,000 MNIST images in every process; "
        "this tree maps the arrays the first process decoded (`baffle.data.cache`, in "
        "`~/.cache/baffle/decoded` unless `BAFFLE_DECODED_CACHE` says otherwise; the "
        "first process on a machine writes them, and the median of 5 is a later one):\n\n"
        + table(["data set", "code", "import torch and Flower", "import baffle",
                 "setup (data, split, model)", "one FedSGD round (cold)",
                 "whole process, spawn to exit"], starts) + "\n\n"
        "Final accuracy with and without SecAgg+, same seeds (digits, 4 clients, K=50, "
        "24 rounds, lr 0.03):\n\n" + table(["aggregation", "test top-1 %", "quantization"], sec)
        + "\n\nSecAgg+ on a loopback deployment (`launch run --secure-aggregation`; "
        f"{SECURE['clients']} SuperNodes, K={SECURE['K']}, {SECURE['rounds']} rounds, the "
        "rest as above): each round is four Flower exchanges (keys, shares, masked vectors, "
        "unmasking), each a new ClientApp process on every node. The payload column counts "
        "what BAFFLE itself needs (the K values; the weights and the basis), the next one "
        "every SecAgg+ message's content as Flower serializes it (keys, encrypted shares, "
        "the masked integer vector and the unmasking shares up; the fit instructions, the "
        "other nodes' keys and shares down; `protocol_bytes_up_per_client` and "
        "`protocol_bytes_down_per_client` in the run's metrics), and the TCP column adds "
        "the message metadata, HTTP framing and polling. The guided row's basis goes to each "
        f"node once, in round {GUIDED['guide-refresh']}.\n\n"
        + table(["aggregation", "deployment s/round", "payload up / down B per round",
                 "SecAgg+ messages up / down B per round", "TCP up / down B per round"],
                secure)
    )
    write_section("flower", "Flower: round time, fixed latency, bytes on the wire, SecAgg+",
                  body)


if __name__ == "__main__":
    main()
