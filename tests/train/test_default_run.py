"""The README's main job with its default flags learns: the loss falls far below uniform over the vocabulary and
the model and log it names at the end exist.

The full default run (1,000 steps) took 5-6 minutes on 2 loaded CPU cores; this test runs the same command,
defaults and all, cut to ``--max-steps 60``, where the default schedule's first 60 steps already take the loss
from uniform (~6.55) to about 4.0 (the mean of steps 41-60 measured; 2.8 by step 200).
"""

from __future__ import annotations

import json
import math
import os
import re

from tests.helpers.launch import log, train

STEPS = 60
LAST = 20  # one 256-token row per step: the loss of a single step is noisy, so the end is averaged


def test_main_job_defaults_learn_and_name_their_outputs(tmp_path):
    out = str(tmp_path / "default")
    res = train(out, "--max-steps", str(STEPS), config="zero3_offload.yaml", procs=2)
    done = re.search(r"done: (\d+) steps; model -> (\S+); log -> (\S+)", res.stdout)
    assert done, res.stdout[-2000:]
    assert int(done.group(1)) == STEPS
    model, log_file = done.group(2), done.group(3)
    assert os.path.exists(os.path.join(model, "config.json")) and os.path.exists(log_file)

    with open(os.path.join(out, "tiny_init", "config.json")) as f:
        uniform = math.log(json.load(f)["vocab_size"])
    losses = [r["loss"] for r in log(out)]
    assert len(losses) == STEPS
    assert abs(losses[0] - uniform) < 0.5  # a random init starts at about uniform
    end = sum(losses[-LAST:]) / LAST
    assert end < uniform - 1.5 and end < losses[0] - 1.5, (losses[0], end, uniform)
