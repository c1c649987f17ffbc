"""Training steps of one peer system on a random-init shape, in one process on one device: what bench_peers times.

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
Every system uses AdamW (lr 1e-5, betas 0.9/0.95, no weight decay) on random tokens, one sequence per step.
One JSON line per step on stdout, prefixed ``PEER_STEP``: step, step_s, tokens_per_s, peak_gpu_gib (the
allocator's peak), host_peak_gib (this process's peak resident memory), loss.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import time

import torch

from easy_context.hf import models

SYSTEMS = ("hf", "hf_liger", "alst")
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


def deepspeed_config(offload: str) -> dict:
    """The ZeRO-3 config of ArcticTraining's one-GPU recipes, with ``offload`` none / optimizer / all."""
    zero = {"stage": 3}
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "bf16": {"enabled": True},
            "zero_optimization": zero, "zero_allow_untested_optimizer": True, "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def build_hf(args, config, device: torch.device):
    """(model, optimizer, step function) of the hf / hf_liger loop."""
    from transformers import AutoModelForCausalLM

    if args.system == "hf_liger":
        liger_patch(config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").to(device)
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
    """The step function of ALST on one GPU (module doc)."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if device.type != "cuda":
        raise SystemExit("alst needs a CUDA GPU (Liger's kernels are Triton)")
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29517").items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed()
    if args.activation_offload:
        arctic_module("monkey_patches").monkey_patch_checkpoint_function_with_cpu_offload()
    mlp = arctic_module("model.tiled_compute")
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    prefix, _ = mlp.get_causal_lm_model_cls_prefix(config.model_type)
    getattr(module, f"{prefix}MLP").forward = mlp.tiled_mlp_forward_common  # enable_tiled_mlp_compute, no hub read
    liger_patch(config.model_type, swiglu=False)
    ds_config = deepspeed_config(args.offload)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841  (zero.Init while the model is built)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()  # reentrant: the checkpoint function ArcticTraining's offload patches
    params = [p for p in model.parameters() if p.requires_grad]
    if args.offload in ("optimizer", "all"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=LR, betas=BETAS, weight_decay=0.0, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, fused=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()

    def step(ids: torch.Tensor) -> float:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model", default="shape:llama3.2-1b", help="a named shape (random init)")
    p.add_argument("--seq-length", type=int, default=32768)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--offload", choices=("none", "optimizer", "all"), default="none", help="alst: ZeRO-3 offload")
    p.add_argument("--activation-offload", action="store_true", help="alst: checkpointed activations to the CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not models.is_shape(args.model):
        raise SystemExit(f"--model must be a named shape (random init, no download); got {args.model!r}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    config = models.load_config(args.model, max_position_embeddings=args.seq_length)
    config.use_cache = False
    step = (build_alst if args.system == "alst" else build_hf)(args, config, device)
    gen = torch.Generator().manual_seed(args.seed)
    for i in range(1, args.steps + 1):
        ids = torch.randint(0, config.vocab_size, (1, args.seq_length), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        record = dict(step=i, step_s=took, tokens_per_s=args.seq_length / took, peak_gpu_gib=peak,
                      host_peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, loss=loss)
        print(PREFIX + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
