"""Kill -9 a real training process mid-run, resume it: same final weights as no kill."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

ARGS = ["--dataset", "digits", "--clients", "4", "--K", "8", "--quiet", "--seed", "3"]


def _train(out, *extra):
    return [sys.executable, "-m", "baffle", "train", *ARGS, *extra, "--out", str(out)]


def _final_state(run):
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    return ckpt["rounds_done"], ckpt["server"]


@pytest.mark.parametrize("extra,kill_after", [
    (["--rounds", "30", "--lr", "0.03"], 9),
    # server-guided directions: the gradient history and the basis resume too
    (["--rounds", "16", "--guide-dims", "3", "--guide-history", "5", "--guide-refresh", "3",
      "--guide-images", "100"], 8),
    (["--mode", "epoch", "--rounds", "6", "--local-steps", "5"], 2),
    (["--mode", "epoch", "--rounds", "6", "--local-steps", "5", "--client-optimizer", "keep"], 2),
    (["--method", "bp-fedavg", "--rounds", "6", "--local-steps", "5",
      "--client-optimizer", "keep"], 2),
])
def test_kill_and_resume_equals_uninterrupted(tmp_path, extra, kill_after):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_train(ref, *extra), check=True, timeout=300)
    proc = subprocess.Popen(_train(cut, *extra))
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = [json.loads(x) for x in metrics.read_text().splitlines() if x.endswith("}")]
    done_at_kill = len(before)
    rounds = int(extra[extra.index("--rounds") + 1])
    assert kill_after <= done_at_kill < rounds, "the kill must land mid-run"

    r = subprocess.run([sys.executable, "-m", "baffle", "train", "--resume", str(cut), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (n_ref, s_ref), (n_cut, s_cut) = _final_state(ref), _final_state(cut)
    assert n_ref == n_cut == rounds
    for part in ("model",):
        for k, v in s_ref[part].items():
            assert torch.equal(v, s_cut[part][k]), k
    if s_ref["ema"] is not None:
        for k, v in s_ref["ema"]["shadow"].items():
            assert torch.equal(v, s_cut["ema"]["shadow"][k]), k
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(rounds))
    # finished rounds were kept, not recomputed: their logged wall times are the first run's
    kept = before[: done_at_kill - 1]
    assert kept and rows[: len(kept)] == kept


def test_resume_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "baffle", "train", "--resume", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a run directory" in r.stderr
    run = tmp_path / "run"
    subprocess.run(_train(run, "--rounds", "2"), check=True, timeout=120)
    (run / "checkpoint.pt").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "baffle", "train", "--resume", str(run)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unreadable" in r.stderr
