"""benchmarks/bench_loss.py: a small CPU run times each system and chunk size, says how far each result is from
the first row's, and writes its JSON; a peer that cannot run is a row that says why; bad flags are refused."""

from __future__ import annotations

import importlib.util
import json

import pytest

import bench_loss

SMALL = ["--cpu", "--model", "shape:llama3.2-1b,vocab_size=512,hidden_size=64", "--tokens", "96", "--steps", "1"]


def test_a_small_cpu_run_compares_eager_and_fused_chunks(tmp_path, capsys):
    out = tmp_path / "loss.json"
    bench_loss.main([*SMALL, "--chunks", "32,96", "--systems", "eager,fused,liger", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["system"] != "liger"]
    assert [(r["system"], r["chunk"]) for r in ours] == [("eager", 32), ("eager", 96), ("fused", 32), ("fused", 96)]
    assert ours[0]["diff"] == [0.0, 0.0, 0.0] and all(max(r["diff"]) < 1e-5 and r["s"] > 0 for r in ours)
    (liger,) = [r for r in rows if r["system"] == "liger"]
    if importlib.util.find_spec("liger_kernel") is None:
        assert "liger_kernel" in liger["failed"]  # said, not dropped
    assert "| fused | 96 |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, says", [(["--systems", "eager,apex"], "unknown ['apex']"),
                                         (["--chunks", "0"], "must be positive")])
def test_bad_flags_are_refused(flags, says, capsys):
    with pytest.raises(SystemExit):
        bench_loss.main([*SMALL, *flags])
    assert says in capsys.readouterr().err
