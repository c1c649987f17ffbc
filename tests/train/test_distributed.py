"""distributed.py: decisions the main process takes for every rank."""

from __future__ import annotations

from easy_context.train import distributed


def _decide_worker(rank, world, calls):
    import pytest

    def refuse():
        open(calls, "a").write(f"{rank}\n")
        raise SystemExit("refused by the main process")

    with pytest.raises(SystemExit, match="refused by the main process"):
        distributed.main_decides(refuse, main=rank == 0)
    assert distributed.main_decides(lambda: f"chosen on {rank}", main=rank == 0) == "chosen on 0"


def test_the_main_process_decides_for_every_rank(tmp_path):
    from tests.helpers.distributed import run_distributed

    calls = str(tmp_path / "calls")
    run_distributed(_decide_worker, 2, calls)
    assert open(calls).read() == "0\n"


REFUSING_SCRIPT = '''
from easy_context.train.distributed import init_distributed, main_decides, run_script


def refuse():
    raise SystemExit("refused: the output directory is in use")


def main():
    launch = init_distributed()
    main_decides(refuse, launch.is_main)


run_script(main)
'''


def test_a_refusal_is_printed_once_and_every_rank_exits_with_its_code(tmp_path):
    import subprocess
    import sys

    from tests.helpers.launch import env

    script = tmp_path / "refuse.py"
    script.write_text(REFUSING_SCRIPT)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=env(), capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    lines = out.splitlines()
    assert lines.count("refused: the output directory is in use") == 1, out  # printed by rank 0 only
    assert out.count("exitcode  : 1 ") == 2, out  # both ranks: 1, the code of a SystemExit with a message
    # the launcher's failure report names the refusal, not a link to torch's docs, as its root cause
    assert "traceback : refused: the output directory is in use" in out, out
