"""Run ONE rank of a P-process train.py run in a single process, every collective a no-op (fake process group).

  accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes 1 \
      benchmarks/emulate_rank.py --world 8 [--rank 0] -- [train.py] <train.py flags>
  ... benchmarks/emulate_rank.py --world 2 -- profile_step.py --step 3 --out prof.json -- <train.py flags>

What each GPU of a P-GPU run holds, measured on one GPU (or the CPU). Before accelerate, DeepSpeed or train.py
can create a process group, this process joins PyTorch's fake one (``torch.testing._internal.distributed.
fake_pg``) as rank ``--rank`` of ``--world``, with RANK, WORLD_SIZE, LOCAL_WORLD_SIZE to match and LOCAL_RANK
0 (device 0). accelerate, DeepSpeed and train.py then size everything for P ranks: the sequence shard (S/P
tokens), the SP/DP/USP groups, ZeRO-3's partitions (1/P of parameters, gradients, optimizer state), its
gathers and reduce-scatters, the DeepSpeed batch arithmetic. No NCCL or gloo group is ever created.

Emulated, as rank r of P has them: shapes, allocations (``peak_gpu_gib`` and the other memory fields of
log.jsonl, host memory of the offloaded partitions), the kernels that run and their compute time
(``step_s``). Rank 0 of 2 emulated on one H200: peak 98.34 GiB, where the real 2x H200 run logged 98.3
(docs/performance.md: 7B shape, 128K, zigzag, zero3.yaml, --keep-attention --fuse-pointwise). Each log
record gets an ``emulate`` entry: rank and world as torch.distributed and accelerate see them, the fraction
of parameters ZeRO-3 keeps here, the model's input shape and the position-id runs of its shard.

Not emulated: communication (no NCCL kernels, buffers or communicators; ``step_s`` is compute only, with
nothing to overlap or wait for) and values. The fake group's collectives hand this rank its own data back
(an all-gather repeats its piece, an all-reduce leaves its value: the logged ``loss``, a "mean", is this
rank's divided by P, and ``--time-limit`` counts 1/P of the time). Receives are looped back here: each gets
the same-shaped send, so rank 0's values stay finite (real-looking data also keeps the GPU's clocks honest).
On rank r > 0 the weights that rank 0 loads and broadcasts never arrive, so its values may be garbage: time
rank 0. Patched (narrowly, each in ``patch`` with why): receives loop back, the startup self-check's
accuracy verdict is ignored, ZeRO-3 never skips a step for a non-finite gradient norm, rank r > 0 writes
the log (and builds the built-in tiny model first), DDP gets a comm hook, and ZeRO-3's cross-rank trace
check is off for r > 0. Use ``--no-save``: saving gathers nothing real (rank r > 0 writes no model, as in
the real run).
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def position_runs(positions: list[int]) -> list[list[int]]:
    """[start, end) runs of consecutive values: [0, 1, 2, 6, 7] -> [[0, 3], [6, 8]]."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([p, p + 1])
    return runs


def join_fake_world(rank: int, world: int) -> None:
    """Set the launcher's environment to rank ``rank`` of ``world`` on device 0 and init the fake group."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    # what torchrun sets for one node of ``world`` processes, as seen by process ``rank``; the device stays 0
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(world),
                      ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(world))
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    # Initialized here, before anything else can: distributed.init_distributed, accelerate's PartialState and
    # deepspeed.init_distributed all skip init_process_group when a default group exists (DeepSpeed wraps it
    # in its TorchBackend), and new_group() without a backend inherits "fake". A group created with an
    # explicit real backend would need a real store: with FakeStore it raises instead of silently joining.
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def patch(rank: int, world: int) -> None:
    """The narrow patches an emulated rank needs; each says why."""
    import torch

    import easy_context as ec
    from easy_context.hf import causal_lm
    from easy_context.hf import self_check as hf_self_check
    from easy_context.train.loop import TrainLoop
    from easy_context.train.run_log import RunLog

    # 1. The startup self-check compares the sharded model with full attention: with no data exchanged it
    # always differs. Keep its run (same kernels, same transient memory) and its routing check; drop the
    # accuracy verdict.
    check = ec.self_check_config

    def self_check_config(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except RuntimeError as e:
            if "differs from full-sequence sdpa" not in str(e):
                raise
            print(f"emulate_rank: self-check accuracy ignored (fake process group): {str(e)[:120]}...",
                  file=sys.stderr)
            return {}

    ec.self_check_config = hf_self_check.self_check_config = self_check_config

    # 2. The fake group's collectives hand each rank its own data back (an all-gather repeats this rank's
    # piece, an all-to-all or reduce-scatter returns its input), but a receive leaves its buffer as
    # allocated. Garbage there (NaN, inf) would spread to the loss and the weights, and the GPU runs kernels on
    # NaN or constant data at other clocks than on real data. So each receive gets a copy of the same-shaped
    # send (the ring's K/V, dK/dV), else zeros: the values stay finite and the copy costs the receive's
    # memory traffic, as NCCL's would.
    from easy_context.attention import comm
    from easy_context.attention import dist_flash
    from easy_context.attention import s2attn

    fake_p2p = comm.p2p

    def loopback_p2p(sends, recvs, group, tag=0):
        pending = fake_p2p(sends, recvs, group, tag)
        for i, (buf, _) in enumerate(recvs):
            src = sends[i][0] if i < len(sends) else None
            if src is not None and src.shape == buf.shape and src.dtype == buf.dtype:
                buf.copy_(src)
            else:
                buf.zero_()
        return pending

    comm.p2p = dist_flash.p2p = s2attn.p2p = loopback_p2p

    # 3. A receive that never happens leaves its buffer as allocated (NaN and inf are common), so the
    # gradient norm is often not finite and ZeRO-3 would skip every optimizer step as an overflow: no
    # optimizer kernels, no optimizer state allocated. Still compute the check (its kernels and device
    # sync are the real run's) but never skip, as a healthy run would not.
    try:
        from deepspeed.runtime.zero import stage3
    except ImportError:
        stage3 = None
    if stage3 is not None:
        invalid = stage3.is_invalid_grad_norm

        def is_invalid_grad_norm(norm) -> bool:
            invalid(norm)
            return False

        stage3.is_invalid_grad_norm = is_invalid_grad_norm

    # 4. DDP (accelerate_configs/ddp.yaml): its reducer needs the all-reduce's future to hold the bucket, and the
    # fake group's holds None (INTERNAL ASSERT in comm.cpp at the first backward). A comm hook that does
    # what the default one does but the all-reduce (divide by the world size) hands the bucket back.
    from torch.nn.parallel import DistributedDataParallel

    ddp_init = DistributedDataParallel.__init__

    def ddp_init_with_hook(self, *args, **kwargs) -> None:
        ddp_init(self, *args, **kwargs)

        def no_allreduce(state, bucket):  # unannotated: DDP rejects the string annotation of __future__
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer().div_(world))
            return fut

        self.register_comm_hook(None, no_allreduce)

    DistributedDataParallel.__init__ = ddp_init_with_hook

    # 5. ZeRO-3's sanity check that every rank traced the same modules (assert_ints_same_as_other_ranks) puts -1
    # on ranks > 0 and broadcasts rank 0's list over it: with no broadcast a rank > 0 always "disagrees".
    # There is no other rank to disagree with; the check goes (rank 0 keeps it: it passes there).
    if rank and stage3 is not None:
        from deepspeed.runtime.zero import partition_parameters, partitioned_param_coordinator

        for module in (stage3, partition_parameters, partitioned_param_coordinator):
            module.assert_ints_same_as_other_ranks = lambda ints: None

    # 6. The emulated rank is the only process, and the log is the measurement: rank r > 0 writes it too
    # (train.py's RunLog writes on the main process only). Nothing else changes: accelerate's
    # is_main_process stays False for r > 0, as in the real run.
    if rank:
        init = RunLog.__init__

        def run_log_init(self, path: str, *, main: bool, **kwargs) -> None:
            init(self, path, main=True, **kwargs)

        RunLog.__init__ = run_log_init
        # its loss is garbage too (often NaN): train.py's stop on a non-finite loss would end the measurement
        TrainLoop.stop_on_non_finite = False

    # 7. Record in each log record what this rank was and trained on (read when the step is logged, not
    # inside it): rank and world as torch.distributed and accelerate see them, the share of the parameters
    # ZeRO-3 keeps here, the model's input shape and the position-id runs of its last forward.
    last: dict = {}
    forward = causal_lm.CausalLMWithLoss.forward

    def recording_forward(self, input_ids, target_ids, position_ids=None, *args, **kwargs):
        last["module"], last["shape"], last["positions"] = self, list(input_ids.shape), position_ids
        return forward(self, input_ids, target_ids, position_ids, *args, **kwargs)

    causal_lm.CausalLMWithLoss.forward = recording_forward
    write = RunLog.write

    def emulated_write(self, record: dict) -> None:
        import torch.distributed as dist
        from accelerate import PartialState

        if "zero3_param_fraction" not in last and "module" in last:  # once: it does not change
            params = list(last["module"].parameters())
            full = sum(getattr(p, "ds_numel", 0) for p in params)
            last["zero3_param_fraction"] = (sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
                                            / full if full else None)
        pos = last.get("positions")
        state = PartialState()
        record["emulate"] = {
            "rank": dist.get_rank(), "world": dist.get_world_size(),
            "accelerate_rank": state.process_index, "accelerate_world": state.num_processes,
            "zero3_param_fraction": last.get("zero3_param_fraction"), "input_shape": last.get("shape"),
            "position_runs": (position_runs(pos.reshape(-1, pos.shape[-1])[0].tolist())
                              if isinstance(pos, torch.Tensor) else None)}
        return write(self, record)

    RunLog.write = emulated_write


def build_default_model(train_argv: list[str]) -> None:
    """Build train.py's built-in default model as its rank 0 would (same call), from train.py's flags
    ``train_argv`` (bad flags exit here, before any work). Needed for an emulated rank r > 0, and before the
    fake group exists: train.py builds it on the main process only, and transformers writes weights on
    torch.distributed rank 0 only. train.py then finds it built and reuses it."""
    from easy_context.hf import models
    from easy_context.train.config import parse_config
    from easy_context.world.default import build_default_world

    cfg = parse_config(train_argv)
    if cfg.model == models.TINY:
        build_default_world(cfg.model_path, preset=cfg.tiny_preset, max_position_embeddings=cfg.seq_length,
                            seed=cfg.seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, required=True, help="P: the number of processes of the emulated run")
    p.add_argument("--rank", type=int, default=0, help="which of them this process is (default 0)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's flags (optionally after "
                   "the script: -- train.py FLAGS), or -- profile_step.py PROFILE_FLAGS -- FLAGS")
    args = p.parse_args()
    argv = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    script = os.path.join(REPO, "train.py")
    if argv[:1] and argv[0].endswith(".py"):  # "-- train.py FLAGS" as well as "-- FLAGS"
        name = os.path.basename(argv[0])
        if name not in ("train.py", "profile_step.py"):
            p.error(f"only train.py (or benchmarks/profile_step.py around it) can be emulated, got {argv[0]}")
        if name == "profile_step.py":
            script = os.path.join(REPO, "benchmarks", "profile_step.py")
        argv = argv[1:]
    # train.py's own flags: for profile_step.py, those after its "--"
    train_args = argv[argv.index("--") + 1:] if script.endswith("profile_step.py") and "--" in argv else argv
    if args.world < 1 or not 0 <= args.rank < args.world:
        p.error(f"need --world >= 1 and 0 <= --rank < --world, got --world {args.world} --rank {args.rank}")
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        p.error(f"launch with --num_processes 1 (WORLD_SIZE is {os.environ['WORLD_SIZE']}): this process is the run")
    if args.rank:
        build_default_model(train_args)
    join_fake_world(args.rank, args.world)
    patch(args.rank, args.world)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
