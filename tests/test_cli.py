"""CLI: flags, TOML config, run directory, bad input gives one line and exit status 2."""

import json
import subprocess
import sys

import pytest

from baffle.cli import main
from baffle.config import TrainConfig, from_dict, load_toml
from baffle.errors import ConfigError

FAST = ["--rounds", "2", "--K", "4", "--clients", "3", "--quiet"]


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "baffle", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args,fragment", [
    (["--K", "0"], "K must be an integer >= 1"),
    (["--sigma", "0"], "sigma must be a finite number > 0"),
    (["--sigma=-1e-4"], "sigma must be a finite number > 0"),
    (["--no-such-flag", "3"], "unrecognized arguments"),
    (["--sigma", "nan"], "sigma must be a finite number > 0"),
    (["--sigma", "inf"], "sigma must be a finite number > 0"),
    (["--dataset", "imagenet"], "unknown dataset"),
    (["--model", "resnet50"], "unknown model"),
    (["--scheme", "backward"], "unknown scheme"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["--norm", "batch"], "BatchNorm"),
    (["--clients", "abc"], "bad value 'abc' for clients"),
    (["--client-optimizer", "keep"], "applies to local epochs"),
    (["--mode", "epoch", "--client-optimizer", "reuse"], "unknown client optimizer"),
    (["--sampler", "mersenne"], "unknown sampler"),
    (["--optimizer", "adamax"], "unknown optimizer"),
])
def test_bad_input_one_line_error(tmp_path, args, fragment):
    r = run_cli("train", *FAST, "--out", str(tmp_path / "run"), *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert fragment.lower() in lines[0].lower(), lines[0]


def test_corrupt_mnist_is_refused_by_the_cli(tmp_path, mnist_dir):
    import shutil

    bad = tmp_path / "mnist"
    shutil.copytree(mnist_dir, bad)
    f = bad / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    r = run_cli("train", *FAST, "--dataset", "mnist", "--data-dir", str(bad),
                "--out", str(tmp_path / "run"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "t10k-labels-idx1-ubyte" in lines[0], r.stderr


def test_toml_config_and_flag_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nK = 7\nsigma = 0.001\nclients = 3\nrounds = 2\nlr_milestones = [5, 9]\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--K", "5", "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["K"] == 5 and saved["sigma"] == 0.001 and saved["clients"] == 3
    assert saved["lr_milestones"] == [5, 9]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["fwd_per_client"] == 6 and rows[0]["bytes_up_per_client"] == 4 * 5 + 8 + 8
    assert (out / "checkpoint.pt").exists() and (out / "summary.md").exists()
    # an existing run is never overwritten by accident
    assert main(["train", "--config", str(cfg), "--out", str(out), "--quiet"]) == 2


def test_unknown_toml_key_and_bad_toml(tmp_path):
    (tmp_path / "a.toml").write_text("Kay = 3\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(load_toml(tmp_path / "a.toml"))
    (tmp_path / "b.toml").write_text("K = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(tmp_path / "b.toml")


def test_config_defaults_follow_the_authors():
    c = TrainConfig()
    assert (c.K, c.sigma, c.scheme, c.clients, c.batch_size) == (100, 1e-4, "forward", 10, 32)
    assert (c.optimizer, c.betas, c.weight_decay, c.clip) == ("adam", (0.9, 0.99), 5e-4, 0.3)
    assert (c.ema, c.ema_decay, c.lr_milestones, c.lr_gamma) == (True, 0.995, (60,), 0.2)
    assert c.replace(dataset="cifar10").resolved_warmup_lr == 0.02
    assert c.replace(dataset="mnist").resolved_warmup_lr is None


def test_plot_compare_and_list(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *FAST, "--out", str(a)]) == 0
    assert main(["train", *FAST, "--method", "bp-fedsgd", "--out", str(b)]) == 0
    png = tmp_path / "c.png"
    assert main(["plot", str(a), str(b), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    r = run_cli("compare", str(a), str(b))
    assert r.returncode == 0 and "baffle-fedsgd" in r.stdout and "bp-fedsgd" in r.stdout
    r = run_cli("list")
    assert "mnist" in r.stdout and "lenet" in r.stdout and "dirichlet" in r.stdout
