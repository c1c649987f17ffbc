"""Recipe scripts: their launch lines run as written (tiny model, CPU, gloo), with sizes turned down by env."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from easy_context.world import default
from easy_context.world.instructions import save_instructions
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


def test_one_gpu_8b_recipe_trains_with_half_the_optimizer_kept_off_the_host(tmp_path):
    out = str(tmp_path / "run")
    e = dict(env(), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
             MODEL="tiny", DATA="tiny", STEPS="2", SEQ="256", OUT=out, MEMORY="--tiled-mlp 128 --fuse-pointwise")
    res = subprocess.run(["bash", "scripts/train_8b_1gpu.sh"], cwd=REPO, env=e, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "1 processes = 1 data-parallel x 1 sequence-parallel" in res.stdout
    assert [r["step"] for r in log(out) if "loss" in r] == [1, 2]
    assert os.path.isfile(os.path.join(out, "model", "config.json"))
    with open(os.path.join(REPO, "accelerate_configs", "zero3_offload_optimizer.json")) as f:
        assert json.load(f)["zero_optimization"]["offload_optimizer"]["ratio"] == 0.5


def test_longalpaca_recipe_fine_tunes_on_an_instruction_file_with_lora_and_s2attn(tmp_path):
    data = save_instructions(str(tmp_path / "long.jsonl"), default.build_tokenizer(), 16, 224)
    out = str(tmp_path / "sft")
    e = dict(env(), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
             MODEL="tiny", SEQ="256", STEPS="2", OUT=out, NPROC="1")
    res = subprocess.run(["bash", "scripts/sft_longalpaca.sh", data], cwd=REPO, env=e, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "16 examples (prompt format llama2) in 16 rows of 256 tokens, one per row, padded" in res.stdout
    assert "1 processes = 1 data-parallel x 1 sequence-parallel (s2attn)" in res.stdout
    assert [r["step"] for r in log(out) if "loss" in r] == [1, 2]
    with open(os.path.join(out, "model", "config.json")) as f:
        config = json.load(f)
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 8
    assert not os.path.exists(os.path.join(out, "model", "adapter_config.json"))  # LoRA merged into the weights
    assert f"final model: {out}/model" in res.stdout
