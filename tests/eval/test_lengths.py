"""Lengths: the sweep from a list or min/max/step, refused at once when it would never end or makes no sense,
and checked against the model's position limit (RoPE scaling raises it; a new RoPE base or an explicit flag
allows going beyond)."""

from __future__ import annotations

import pytest

from easy_context.eval.lengths import check_lengths, length_sweep
from tests.helpers.tiny_models import tiny_model


def test_length_sweep():
    assert length_sweep([512, 256, 512]) == [256, 512]
    assert length_sweep(None, 100, 400, 100) == [100, 200, 300, 400]
    assert length_sweep(None, 256, 1000) == [256, 512, 1000]  # doubling, the max always included
    for args, match in [((None, 10, 5), "above"), ((None, 10, 20, 0), "step"), ((None,), "lengths"),
                        (([1],), "at least 2")]:
        with pytest.raises(ValueError, match=match):
            length_sweep(*args)


@pytest.mark.parametrize("args, match", [
    ((None, 0, 512), "--min-length must be at least 2"),
    ((None, -4, 512), "--min-length must be at least 2"),
    ((None, 0, 512, 64), "--min-length must be at least 2"),
    ((None, 256, 0), "--max-length must be at least 2"),
    ((None, 256, 512, -64), "--length-step must be at least 1"),
    ((None, 256, None), "give the lengths"),
    (([256, 0],), "--lengths must be at least 2"),
])
def test_length_sweep_refuses_lengths_that_never_end_or_make_no_sense(args, match):
    import signal

    def hang(*_):  # today's doubling from 0 (or from a negative length) never ends
        raise TimeoutError("length_sweep did not return")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(5)
    try:
        with pytest.raises(ValueError, match=match):
            length_sweep(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_position_limit():
    config = tiny_model("llama", 0).config  # max_position_embeddings 1024
    check_lengths([512, 1024], config)
    with pytest.raises(ValueError, match="position limit of 1024.*--allow-extrapolation"):
        check_lengths([512, 2048], config)
    check_lengths([2048], config, allow_extrapolation=True)
    check_lengths([2048], config, rope_theta=1e6)  # a new RoPE base: the limit is the user's call
    from easy_context.hf.models import apply_rope

    apply_rope(config, rope_scaling="linear:factor=4")
    check_lengths([4096], config)
    with pytest.raises(ValueError, match="4096"):
        check_lengths([8192], config)


@pytest.mark.parametrize("scaling", ["yarn:factor=16", "dynamic:factor=16"])
def test_a_rope_scaling_by_a_factor_reaches_that_many_times_the_training_length(scaling):
    # dynamic NTK is made for lengths up to factor x the original too: a no-training baseline at 16x must run
    from easy_context.hf.models import apply_rope

    config = apply_rope(tiny_model("llama", 0).config, rope_scaling=scaling)  # trained at 1024
    check_lengths([16 * 1024], config)
    with pytest.raises(ValueError, match="position limit of 16384"):
        check_lengths([32 * 1024], config)
