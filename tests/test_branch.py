"""Branching a run: a schedule ablation trained from another run's checkpoint ends with the
same weights, bit for bit, as training it from round 0; anything inexact is refused."""

import json
import shutil

import pytest
import torch

from baffle import TrainConfig, train
from baffle.cli import main
from baffle.errors import ConfigError
from baffle.rundir import RunDir
from baffle.simulator import RunLog, setup

BASE = TrainConfig(dataset="digits", clients=2, K=4, lr=0.03, ema=True, epochs=2)
# a K schedule and an lr decay that start at epoch 2, where BASE stopped
LATER = dict(epochs=3, K_milestones=(2,), K_values=(8,), lr_milestones=(2,), lr_gamma=0.5)


def _state(run):
    return torch.load(run / "checkpoint.pt", weights_only=False)["server"]


def _rows(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("branch") / "source"
    train(BASE, run_dir=run)
    return run


def test_a_branch_equals_training_its_config_from_scratch(source, tmp_path):
    new = BASE.replace(**LATER)
    ref = train(new, run_dir=tmp_path / "ref")
    train(new, run_dir=tmp_path / "branch", branch_from=source)

    a, b = _state(tmp_path / "ref"), _state(tmp_path / "branch")
    for part in ("model", "optimizer"):
        assert a[part].keys() == b[part].keys()
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["ema"]["shadow"].items():
        assert torch.equal(v, b["ema"]["shadow"][k]), k
    assert _rows(tmp_path / "ref") == _rows(tmp_path / "branch")
    # the branch trained the new schedule after the source's rounds, and says where from
    rpe = len(_rows(source)) // 2
    assert {r["K"] for r in ref.metrics[:2 * rpe]} == {4}
    assert {r["K"] for r in ref.metrics[2 * rpe:]} == {8}
    info = json.loads((tmp_path / "branch" / "branch.json").read_text())
    assert info["rounds_done"] == 2 * rpe
    assert set(info["changed"]) == set(LATER)


def test_the_source_is_left_as_it_was(source, tmp_path):
    before = (source / "metrics.jsonl").read_bytes(), (source / "checkpoint.pt").read_bytes()
    train(BASE.replace(epochs=3), run_dir=tmp_path / "longer", branch_from=source)
    assert before == ((source / "metrics.jsonl").read_bytes(),
                      (source / "checkpoint.pt").read_bytes())


@pytest.mark.parametrize("changes,fragment", [
    (dict(sigma=1e-3), "sigma would change the rounds already trained"),
    (dict(seed=1), "seed would change"),
    (dict(epochs=3, K_milestones=(1,), K_values=(8,)), "differs in epoch 1 (lr 0.03 -> 0.03, K 4"),
    (dict(epochs=3, lr_milestones=(0,)), "differs in epoch 0"),
    (dict(epochs=1), "fewer than the"),
])
def test_a_branch_that_would_rewrite_trained_rounds_is_refused(source, tmp_path, changes,
                                                               fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        train(BASE.replace(**changes), run_dir=tmp_path / "b", branch_from=source)
    assert not (tmp_path / "b").exists()


def test_a_source_without_a_checkpoint_is_refused(source, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(ConfigError, match="has no checkpoint to branch from"):
        train(BASE.replace(epochs=3), run_dir=tmp_path / "b", branch_from=bare)


def test_a_source_missing_metrics_rows_or_a_branch_without_a_new_directory_is_refused(
        source, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(source, cut)
    RunDir(cut).write_metrics(_rows(cut)[:-1])  # a checkpoint ahead of its metrics
    with pytest.raises(ConfigError, match="metrics.jsonl lacks some of the .* resume that run"):
        train(BASE.replace(epochs=3), run_dir=tmp_path / "b", branch_from=cut)
    with pytest.raises(ConfigError, match="a branch needs a new run directory"):
        train(BASE.replace(epochs=3), branch_from=source)
    with pytest.raises(ConfigError, match="a branch needs a new run directory"):
        train(BASE.replace(epochs=3), run_dir=tmp_path / "c", resume=True, branch_from=source)
    assert not (tmp_path / "b").exists()


def test_cli_branch_takes_the_source_config_and_changes_only_the_flags(source, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--branch", str(source), "--out", str(out), "--epochs", "3",
               "--K-milestones", "2", "--K-values", "8", "--quiet"])
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["K_values"], saved["lr"], saved["clients"]) == ([8], 0.03, 2)
    assert main(["train", "--branch", str(source), "--epochs", "3", "--quiet"]) == 2
    assert main(["train", "--branch", str(source), "--out", str(source), "--overwrite",
                 "--epochs", "3", "--quiet"]) == 2
    assert (source / "checkpoint.pt").exists()  # --overwrite did not delete the source
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --branch needs --out, the new run's directory",
                   "error: --out must name a new directory, not the --branch run"]


def test_resuming_with_another_config_is_checked_like_a_branch(source, tmp_path):
    """A Flower server resumes with the run config it is given (``RunLog.open``): longer or
    rescheduled after the checkpoint goes on, and the saved config follows; any other
    change is refused and leaves the run as it was."""
    run = tmp_path / "run"
    shutil.copytree(source, run)
    rows = _rows(run)
    with pytest.raises(ConfigError, match="^resuming with another config may change only "
                                          r".*; sigma would change the rounds already trained"):
        RunLog(run).open(setup(BASE.replace(sigma=1e-3, epochs=3)), resume=True)
    with pytest.raises(ConfigError, match="differs in epoch 1"):
        RunLog(run).open(setup(BASE.replace(epochs=3, K_milestones=(1,), K_values=(8,))),
                         resume=True)
    assert RunDir(run).config() == BASE and _rows(run) == rows
    longer = BASE.replace(**LATER)
    start, _ = RunLog(run).open(setup(longer), resume=True)
    assert start == len(rows) and RunDir(run).config() == longer


# --keep-every: a branch from any kept epoch, not only from the source's last checkpoint
KEEPING = BASE.replace(epochs=3, keep_every=1)
# an lr decay from epoch 1: exact from the checkpoint kept after epoch 1, not after 2 or 3
DECAY1 = dict(lr_milestones=(1,), lr_gamma=0.5)


def _model_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def keeping(tmp_path_factory):
    run = tmp_path_factory.mktemp("keep") / "source"
    train(KEEPING, run_dir=run)
    return run


def test_kept_checkpoints_are_the_state_at_each_epochs_end(keeping):
    assert RunDir(keeping).kept_epochs() == [1, 2, 3]
    rpe = len(_rows(keeping)) // 3
    kept = [RunDir(keeping).load_kept(e) for e in (1, 2, 3)]
    assert [k["rounds_done"] for k in kept] == [rpe, 2 * rpe, 3 * rpe]
    # the last epoch's is the final checkpoint; the first two differ from it and each other
    assert _model_equal(kept[2]["server"]["model"], _state(keeping)["model"])
    assert not _model_equal(kept[0]["server"]["model"], kept[1]["server"]["model"])
    # a run without --keep-every keeps nothing
    assert RunDir(keeping.parent / "nothing").kept_epochs() == []


def test_a_branch_from_a_kept_epoch_equals_training_its_config_from_scratch(keeping, tmp_path):
    new = KEEPING.replace(keep_every=0, **DECAY1)
    train(new, run_dir=tmp_path / "ref")
    train(new, run_dir=tmp_path / "branch", branch_from=keeping, branch_epoch=1)
    a, b = _state(tmp_path / "ref"), _state(tmp_path / "branch")
    assert _model_equal(a["model"], b["model"])
    assert _model_equal(a["ema"]["shadow"], b["ema"]["shadow"])
    assert _rows(tmp_path / "ref") == _rows(tmp_path / "branch")
    # and it differs from the source, which kept lr 0.03 after epoch 1
    assert not _model_equal(a["model"], _state(keeping)["model"])
    info = json.loads((tmp_path / "branch" / "branch.json").read_text())
    assert (info["epoch"], info["rounds_done"]) == (1, len(_rows(keeping)) // 3)
    assert set(info["changed"]) == {"keep_every", *DECAY1}


@pytest.mark.parametrize("epoch,changes,fragment", [
    (2, DECAY1, "differs in epoch 1"),  # epoch 2's checkpoint trained epoch 1 at lr 0.03
    (4, {}, r"kept no checkpoint at the end of epoch 4 \(kept: 1, 2, 3\); train the source"),
])
def test_a_branch_from_a_kept_epoch_is_checked_like_any_branch(keeping, tmp_path, epoch,
                                                              changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        train(KEEPING.replace(**changes), run_dir=tmp_path / "b", branch_from=keeping,
              branch_epoch=epoch)
    assert not (tmp_path / "b").exists()


def test_a_source_that_kept_nothing_or_a_corrupt_kept_file_is_refused(source, keeping,
                                                                      tmp_path):
    with pytest.raises(ConfigError, match=r"at the end of epoch 1 \(kept: none\)"):
        train(BASE, run_dir=tmp_path / "b", branch_from=source, branch_epoch=1)
    bad = tmp_path / "bad"
    shutil.copytree(keeping, bad)
    (bad / "kept" / "epoch-1.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"kept/epoch-1.pt is unreadable \(.*\); branch from "
                                          "another epoch or from the last checkpoint"):
        train(KEEPING, run_dir=tmp_path / "b", branch_from=bad, branch_epoch=1)
    with pytest.raises(ConfigError, match="--branch-epoch names an epoch of the --branch run"):
        train(KEEPING, run_dir=tmp_path / "b", branch_epoch=1)
    assert not (tmp_path / "b").exists()


def test_resuming_drops_kept_epochs_past_the_checkpoint_and_keeps_them_again(keeping,
                                                                            tmp_path):
    """A run killed with its rolling checkpoint behind a kept epoch (``checkpoint_every``
    > 1) trains that epoch again on resume; the epoch is kept again, the same bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(keeping, run)
    shutil.copy(run / "kept" / "epoch-1.pt", run / "checkpoint.pt")
    start, _ = RunLog(run).open(setup(KEEPING), resume=True)
    assert start == len(_rows(keeping)) // 3 and RunDir(run).kept_epochs() == [1]
    train(KEEPING, run_dir=run, resume=True)
    assert RunDir(run).kept_epochs() == [1, 2, 3]
    for e in (2, 3):
        assert _model_equal(RunDir(run).load_kept(e)["server"]["model"],
                            RunDir(keeping).load_kept(e)["server"]["model"])


def test_cli_branch_epoch(keeping, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["train", "--branch", str(keeping), "--branch-epoch", "1", "--out", str(out),
                 "--lr-milestones", "1", "--lr-gamma", "0.5", "--quiet"]) == 0
    assert json.loads((out / "branch.json").read_text())["epoch"] == 1
    assert main(["train", "--branch-epoch", "1", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert main(["train", "--resume", str(out), "--branch-epoch", "1", "--quiet"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["train", "--branch", str(keeping), "--branch-epoch", "0", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == ["error: --branch-epoch names an epoch of the --branch run; add --branch",
                       "error: --resume continues the run's saved config; drop --config, "
                       "--branch and --branch-epoch"]
    assert "argument --branch-epoch: an epoch number >= 1 (got '0')" in err[2]
    assert not (tmp_path / "x").exists()


def test_cli_resume_with_flags_lengthens_and_reschedules_the_run_in_place(source, tmp_path,
                                                                          capsys):
    """``--resume RUN --epochs 3 ...`` continues RUN under the changed config: the same
    weights as training that config from round 0; a change to trained rounds is refused."""
    run = tmp_path / "run"
    shutil.copytree(source, run)
    rows = _rows(run)
    assert main(["train", "--resume", str(run), "--sigma", "1e-3", "--quiet"]) == 2
    assert main(["train", "--resume", str(run), "--epochs", "3", "--lr-milestones", "1",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "sigma would change the rounds already trained" in err[0]
    assert "differs in epoch 1" in err[1]
    assert RunDir(run).config() == BASE and _rows(run) == rows  # refused: untouched
    assert main(["train", "--resume", str(run), "--epochs", "3", "--K-milestones", "2",
                 "--K-values", "8", "--lr-milestones", "2", "--lr-gamma", "0.5",
                 "--keep-every", "1", "--quiet"]) == 0
    new = BASE.replace(**LATER, keep_every=1)
    assert RunDir(run).config() == new
    train(new, run_dir=tmp_path / "ref")
    assert _model_equal(_state(run)["model"], _state(tmp_path / "ref")["model"])
    assert _rows(run) == _rows(tmp_path / "ref")
    assert RunDir(run).kept_epochs() == [3]  # epochs 1-2 were trained before --keep-every
