"""easy_context/ is copied into other codebases: the folder alone, in a fresh directory, runs exact attention."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import easy_context

SCRIPT = textwrap.dedent('''
    import os, sys, tempfile
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import torch.nn.functional as F

    def worker(rank, world, init):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        import easy_context as ec
        assert os.path.dirname(os.path.dirname(ec.__file__)) == os.getcwd(), ec.__file__
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, 64, 16, dtype=torch.float64, generator=gen) for _ in range(3))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = F.scaled_dot_product_attention(*full, is_causal=True)
        ref.sum().backward()
        mine = [ec.shard(t, "zigzag", rank, world, dim=2).requires_grad_() for t in (q, k, v)]
        out = ec.zigzag_ring_attention(*mine, causal=True)
        out.sum().backward()
        torch.testing.assert_close(out, ec.shard(ref, "zigzag", rank, world, dim=2), rtol=1e-10, atol=1e-10)
        for got, want in zip(mine, full):
            torch.testing.assert_close(got.grad, ec.shard(want.grad, "zigzag", rank, world, dim=2),
                                       rtol=1e-10, atol=1e-10)
        done = torch.ones(1)
        dist.all_reduce(done)
        if rank == 0:
            print(f"{int(done.item())} ranks exact", flush=True)
        dist.destroy_process_group()  # left to interpreter exit, gloo's teardown at times aborts a rank

    if __name__ == "__main__":
        with tempfile.TemporaryDirectory() as d:
            mp.start_processes(worker, args=(2, "file://" + os.path.join(d, "store")), nprocs=2,
                               start_method="spawn")
''')


def test_the_package_folder_alone_runs_a_two_process_exact_check(tmp_path):
    shutil.copytree(os.path.dirname(easy_context.__file__), tmp_path / "easy_context",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "check.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "check.py"], cwd=tmp_path, env=dict(env, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "2 ranks exact", res.stdout
