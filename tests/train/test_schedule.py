"""schedule.py: the learning rate at every step comes from the flags alone."""

import math

import pytest

from easy_context.train.schedule import learning_rate, set_learning_rate


def test_warmup_then_constant():
    assert [learning_rate(s, lr=1.0, warmup_steps=4, max_steps=10) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]


@pytest.mark.parametrize("schedule, mid", [("linear", 0.55), ("cosine", 0.55)])
def test_decay_runs_from_lr_to_the_floor(schedule, mid):
    f = lambda s: learning_rate(s, lr=1.0, warmup_steps=0, max_steps=10, schedule=schedule, min_lr_ratio=0.1)
    assert f(0) == 1.0 and math.isclose(f(10), 0.1) and math.isclose(f(5), mid)
    assert all(f(s) >= f(s + 1) for s in range(10))


def test_unknown_schedule_and_setting_the_optimizer():
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        learning_rate(0, lr=1.0, warmup_steps=0, max_steps=1, schedule="step")

    class Opt:
        param_groups = [{"lr": 0.0}, {"lr": 0.0}]

    set_learning_rate(Opt, 3e-4)
    assert [g["lr"] for g in Opt.param_groups] == [3e-4, 3e-4]
