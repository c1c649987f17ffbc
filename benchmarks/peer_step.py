"""Training steps of one peer system on a random-init shape (one process, or P under torchrun): what bench_peers
times.

  python benchmarks/peer_step.py --system hf_liger --model shape:llama3.2-1b --seq-length 32768 --steps 4

Systems, each set up as its own documentation sets it up:
  hf        a Hugging Face loop: fp32 master weights, bf16 autocast (CUDA), sdpa attention, non-reentrant gradient
            checkpointing, torch's fused AdamW, the loss from ``model(labels=...)``.
  hf_liger  the same after ``liger_kernel.transformers.apply_liger_kernel_to_<family>()``: fused linear cross
            entropy, RMSNorm, SwiGLU, RoPE (what HF Trainer's ``use_liger_kernel`` does).
  alst      DeepSpeed's Arctic Long Sequence Training for one GPU, wired as ArcticTraining's
            ``run-h200-sp1-llama-8b-*`` recipes wire it: a ZeRO-3 engine with bf16 weights (``--offload``: none,
            the optimizer, or parameters and optimizer on the CPU), Liger's model with SwiGLU left to the tiled
            MLP, ArcticTraining's tiled MLP (``enable_tiled_mlp_compute``) and its activation-checkpoint CPU
            offload (``monkey_patch_checkpoint_function_with_cpu_offload``), both loaded from the arctic-training
            package's own files. ArcticTraining itself (its trainer) needs transformers < 5; these pieces do not.
            Under torchrun with P processes it is ALST at sp=P as ArcticTraining wires it: DeepSpeed's
            ``UlyssesSPAttentionHF.register_with_transformers`` over sdpa, its mpu given to the engine, the data
            through ``UlyssesSPDataLoaderAdapter`` (each rank's loader gives a sequence; each step all P ranks
            train one of them, a 1/P slice each, with pre-shifted labels), and ArcticTraining's loss: each rank's
            mean over its slice, averaged over the ranks weighted by their counted tokens (differentiably).
  torch_cp  PyTorch's own context parallel over P processes (torchrun): benchmarks/peer_cp.py says how.
Every system uses AdamW (lr 1e-5, betas 0.9/0.95, no weight decay) on random tokens, one sequence per step.
One JSON line per step on stdout (rank 0), prefixed ``PEER_STEP``: step, step_s, tokens_per_s (the sequence's
tokens over the step time, all ranks together), peak_gpu_gib (the allocator's peak), host_peak_gib (the process's
peak resident memory), loss; over P processes the step time and peaks are the largest rank's.

  torchrun --nproc_per_node 8 benchmarks/peer_step.py --system torch_cp --seq-length 131072 --rotate alltoall
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import time

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (differentiable all_gather of sp_loss)
import torch.nn.functional as F

from easy_context.hf import models
from easy_context.memory.offload import check_zero_offload_host
from peer_cp import ROTATE, build_torch_cp
from profile_step import profile_record, step_profiler

SYSTEMS = ("hf", "hf_liger", "alst", "torch_cp")
PREFIX = "PEER_STEP "
LR, BETAS = 1e-5, (0.9, 0.95)


def liger_patch(model_type: str, *, swiglu: bool = True) -> None:
    """Liger's kernels patched into transformers' classes for ``model_type`` (before the model is built)."""
    from liger_kernel.transformers import monkey_patch

    apply = monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        raise SystemExit(f"liger-kernel has no kernels for model type {model_type!r}")
    apply(rope=True, rms_norm=True, swiglu=swiglu, cross_entropy=False, fused_linear_cross_entropy=True)


def arctic_module(name: str):
    """A module file of the installed arctic-training package, loaded alone (its package __init__ imports its
    whole trainer, which needs transformers < 5)."""
    spec = importlib.util.find_spec("arctic_training")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("alst needs the arctic-training package: pip install --no-deps arctic-training")
    path = os.path.join(spec.submodule_search_locations[0], *name.split(".")) + ".py"
    module_spec = importlib.util.spec_from_file_location(f"_arctic_{name.replace('.', '_')}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when run alone."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def deepspeed_config(offload: str, sp: int = 1) -> dict:
    """The ZeRO-3 config of ArcticTraining's recipes, with ``offload`` none / optimizer / all, at sp=``sp``."""
    zero = {"stage": 3}
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
              "zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
              "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if sp > 1:  # zero.Init's data-parallel world is the ranks over sp
        config["sequence_parallel_size"] = sp
    return config


class RandomSequences(torch.utils.data.IterableDataset):
    """Endless random sequences as a data loader gives them to Ulysses: input_ids, labels, position_ids."""

    def __init__(self, vocab: int, seq: int, seed: int):
        self.vocab, self.seq, self.seed = vocab, seq, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            ids = torch.randint(0, self.vocab, (self.seq,), generator=gen)
            yield {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(self.seq)}


def ulysses_register(model, sp: int, seq: int):
    """DeepSpeed's Ulysses attention over sdpa registered with transformers for ``model``; its mpu."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation="sdpa", sequence_parallel_size=sp, micro_batch_size=1,
        seq_length=seq, seq_length_is_variable=True)


def ulysses_batches(mpu, vocab: int, seq: int, seed: int, device: torch.device):
    """This rank's slices, one sequence per step, through UlyssesSPDataLoaderAdapter (rank r's loader: seed + r)."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    rank = mpu.get_sequence_parallel_rank()
    loader = torch.utils.data.DataLoader(RandomSequences(vocab, seq, seed + rank), batch_size=1)
    return UlyssesSPDataLoaderAdapter(loader, sp_rank=rank, sp_group=mpu.get_sequence_parallel_group(),
                                      sp_world_size=mpu.get_sequence_parallel_world_size(), device=device)


def sp_loss(outputs, shift_labels: torch.Tensor, group) -> torch.Tensor:
    """ArcticTraining's Ulysses loss: the ranks' mean losses weighted by their counted tokens, gathered
    differentiably. Liger's model returns the loss from ``shift_labels``; a plain HF model only logits."""
    loss = outputs.loss
    if loss is None:
        loss = F.cross_entropy(outputs.logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=-100)
    losses = torch.distributed.nn.functional.all_gather(loss, group=group)
    good = (shift_labels != -100).sum()
    goods = torch.distributed.nn.functional.all_gather(good, group=group)
    return sum(l * n for l, n in zip(losses, goods)) / max(sum(goods), 1)


def build_hf(args, config, device: torch.device):
    """The step function of the hf / hf_liger loop."""
    from transformers import AutoModelForCausalLM

    if args.system == "hf_liger":
        liger_patch(config.model_type)
    with device:  # a random init on the GPU takes a moment, on the CPU most of a minute (8B)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=0.0, fused=cuda)

    def step(ids: torch.Tensor) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def build_alst(args, config, device: torch.device):
    """(step function, its batches or None) of ALST on one GPU, or at sp=P under torchrun (module doc)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if device.type != "cuda":
        raise SystemExit("alst needs a CUDA GPU (Liger's kernels are Triton)")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517").items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed()
    sp = world()[1]
    if args.activation_offload:
        arctic_module("monkey_patches").monkey_patch_checkpoint_function_with_cpu_offload()
    mlp = arctic_module("model.tiled_compute")
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    prefix, _ = mlp.get_causal_lm_model_cls_prefix(config.model_type)
    getattr(module, f"{prefix}MLP").forward = mlp.tiled_mlp_forward_common  # enable_tiled_mlp_compute, no hub read
    liger_patch(config.model_type, swiglu=False)
    ds_config = deepspeed_config(args.offload, sp)
    # the host arithmetic train.py applies: fail here in seconds rather than at the OOM killer minutes later
    check_zero_offload_host(ds_config, models.parameter_count(config))
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init while the model is built)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()  # reentrant: the checkpoint function ArcticTraining's offload patches
    mpu = ulysses_register(model, sp, args.seq_length) if sp > 1 else None
    params = [p for p in model.parameters() if p.requires_grad]
    if args.offload in ("optimizer", "all"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=LR, betas=BETAS, weight_decay=0.0, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    engine.train()

    if mpu is None:
        def step(ids: torch.Tensor) -> float:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            return loss.item()

        return step, None

    def sp_step(batch: dict) -> float:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = sp_loss(engine(**batch, use_cache=False), batch["shift_labels"], mpu.get_sequence_parallel_group())
        engine.backward(loss)
        engine.step()
        return loss.item()

    return sp_step, ulysses_batches(mpu, config.vocab_size, args.seq_length, args.seed, device)


def full_sequences(vocab: int, seq: int, seed: int, device: torch.device):
    """Endless random (1, seq) token batches, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (1, seq), generator=gen).to(device)


def largest(values: list[float], device: torch.device) -> list[float]:
    """Each value's largest over the ranks (the values themselves when run alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model", default="shape:llama3.2-1b", help="a named shape (random init)")
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--offload", choices=("none", "optimizer", "all"), default="none", help="alst: ZeRO-3 offload")
    p.add_argument("--activation-offload", action="store_true", help="alst: checkpointed activations to the CPU")
    p.add_argument("--rotate", choices=ROTATE, default="allgather", help="torch_cp: set_rotate_method's method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None, help="profile the last step with torch.profiler and write its "
                   "kernel summary here (profile_step.py's record; rank 0); that step's record says profiled")
    args = p.parse_args(argv)
    if not models.is_shape(args.model):
        raise SystemExit(f"--model must be a named shape (random init, no download); got {args.model!r}")
    rank, size, local = world()
    if size > 1 and args.system in ("hf", "hf_liger"):
        raise SystemExit(f"{args.system} has no sequence parallelism: run it as one process")
    if size == 1 and args.system == "torch_cp":
        raise SystemExit("torch_cp needs P > 1 processes (torchrun --nproc_per_node P)")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    config = models.load_config(args.model, max_position_embeddings=args.seq_length)
    config.use_cache = False
    batches = None
    if args.system == "alst":
        step, batches = build_alst(args, config, device)
    elif args.system == "torch_cp":
        dist.init_process_group("nccl" if cuda else "gloo")
        step = build_torch_cp(config, device, args.rotate, LR, BETAS)
    else:
        step = build_hf(args, config, device)
    batches = batches or full_sequences(config.vocab_size, args.seq_length, args.seed, device)
    for i in range(1, args.steps + 1):
        batch = next(batches)
        profiled = bool(args.profile) and i == args.steps
        prof = step_profiler() if profiled else None
        if cuda:
            torch.cuda.synchronize()
        if prof is not None:
            prof.start()
        start = time.perf_counter()
        loss = step(batch)
        if cuda:
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        if prof is not None:
            prof.stop()
            if rank == 0:
                with open(args.profile, "w") as f:
                    json.dump(profile_record(prof, i, took), f, indent=1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        took, peak, host = largest([took, peak, host], device)
        record = dict(step=i, step_s=took, tokens_per_s=args.seq_length / took, peak_gpu_gib=peak,
                      host_peak_gib=host, loss=loss, **({"profiled": True} if profiled else {}))
        if rank == 0:
            print(PREFIX + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
