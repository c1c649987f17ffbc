"""Recipe scripts: their launch lines run as written (tiny model, CPU, gloo), with sizes turned down by env."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.launch import REPO, env, log


def test_1m_recipe_launches_train_with_its_memory_settings(tmp_path):
    out = str(tmp_path / "run")
    e = dict(env(), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
             MODEL="tiny", DATA="tiny", STEPS="2", SEQ="512", OUT=out,
             MEMORY="--tiled-mlp 128 --offload-activations 2")  # the tiny model has fewer layers than 28
    res = subprocess.run(["bash", "scripts/train_1m_2gpu.sh"], cwd=REPO, env=e, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    steps = [r for r in log(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert os.path.isfile(os.path.join(out, "model", "config.json"))
    assert f"final model: {out}/model" in res.stdout
