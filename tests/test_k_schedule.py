"""The K schedule: K(epoch) is a pure function; clients upload, and the server expects and
rebuilds with, the scheduled K; a bad schedule is a one-line error."""

import pytest
import torch

from baffle.cli import main
from baffle.config import TrainConfig
from baffle.errors import ConfigError
from baffle.estimator import EstimatorSpec
from baffle.schedule import k_at
from baffle.simulator import setup, train


def test_k_at_steps_at_each_milestone():
    got = [k_at(e, 25, (2, 4), (50, 100)) for e in range(6)]
    assert got == [25, 25, 50, 50, 100, 100]
    assert [k_at(e, 7) for e in range(3)] == [7, 7, 7]
    assert k_at(3, 25, (0,), (10,)) == 10  # a milestone at 0 replaces K from the start


@pytest.mark.parametrize("milestones,values,fragment", [
    ((2, 4), (50,), "one K per milestone"),
    ((4, 2), (50, 100), "increasing"),
    ((2, 2), (50, 100), "increasing"),
    ((-1,), (50,), "increasing epochs >= 0"),
    ((2,), (0,), "K_values must be integers >= 1"),
])
def test_bad_k_schedule_is_a_one_line_config_error(milestones, values, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        TrainConfig(K_milestones=milestones, K_values=values)
    assert "\n" not in str(e.value)


def test_bad_k_schedule_flag_exits_2_with_one_line(tmp_path, capsys):
    code = main(["train", "--dataset", "digits", "--rounds", "1", "--K-milestones", "1,2",
                 "--K-values", "5", "--out", str(tmp_path / "r"), "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "--K-values" in err[0], err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


BASE = TrainConfig(dataset="digits", clients=4, K=3, ema=False, batch_size=64)


def _uploads(cfg):
    seen: dict[int, set] = {}

    def spy(r, u):
        seen.setdefault(r, set()).add(tuple(u.diffs.shape))
        return u

    return train(cfg, upload_hook=spy), seen


def test_fedsgd_rounds_follow_the_schedule_and_the_first_epoch_is_unchanged():
    rpe = setup(BASE.replace(rounds=1)).rounds_per_epoch
    sched = BASE.replace(rounds=rpe + 2, K_milestones=(1,), K_values=(6,))
    res, shapes = _uploads(sched)
    assert [shapes[r] for r in range(rpe + 2)] == [{(3,)}] * rpe + [{(6,)}] * 2
    for rec in res.metrics:  # the server expected the scheduled K: nothing rejected
        want = 3 if rec["round"] < rpe else 6
        assert (rec["K"], rec["accepted"], rec["rejected"]) == (want, 4, 0)
        assert rec["fwd_per_client"] == want + 1
        assert rec["bytes_up_per_client"] == 4 * want + 8 + 8
    # before the milestone the run is bit for bit the constant-K run
    const = train(BASE.replace(rounds=rpe))
    assert [r["train_loss"] for r in res.metrics[:rpe]] == [r["train_loss"] for r in const.metrics]
    # after it, the model moved on from there with K=6 (not frozen, not rejected)
    a = torch.cat([p.flatten() for p in res.model.parameters()])
    b = torch.cat([p.flatten() for p in const.model.parameters()])
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_epoch_mode_replays_each_round_with_its_own_k():
    cfg = BASE.replace(mode="epoch", local_steps=2, rounds=3, K_milestones=(1, 2),
                       K_values=(5, 2), seed_sharing="client")
    res, shapes = _uploads(cfg)
    assert [shapes[r] for r in range(3)] == [{(2, 3)}, {(2, 5)}, {(2, 2)}]
    assert [(r["K"], r["accepted"]) for r in res.metrics] == [(3, 4), (5, 4), (2, 4)]


def test_round_spec_check_catches_a_client_with_another_schedule():
    pytest.importorskip("flwr")
    from baffle.directions import DirectionScheme
    from baffle.flower.wire import check_round_spec, round_config

    sent = round_config(7, 123, 0.01, EstimatorSpec(50, 1e-4, "forward"), DirectionScheme())
    check_round_spec(EstimatorSpec(50, 1e-4, "forward"), sent)  # same: no error
    with pytest.raises(ConfigError, match=r"K, K-milestones, K-values") as e:
        check_round_spec(EstimatorSpec(25, 1e-4, "forward"), sent)
    assert "\n" not in str(e.value)
