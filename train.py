"""Long-context fine-tuning of a Hugging Face causal LM with exact sequence-parallel attention.

  accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes 8 train.py \
      --model meta-llama/Llama-2-7b-hf --dataset <hub name or path> --seq-length 262144 \
      --backend zigzag_ring --rope-theta 1e7 --output-dir output/stage3

With no --model/--dataset it trains the built-in tiny model on generated retrieval data (no downloads).
Processes are split into sequence-parallel groups of --sp-size ranks (default: all); the rest is data parallel.
"""

import argparse
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs, set_seed
from datetime import timedelta

import easy_context as ec
from easy_context.attention.layouts import check_length
from easy_context.hf import models
from easy_context.hf.attention import num_parameters
from easy_context.memory import offload
from easy_context.parallel.groups import group_layout
from easy_context.train import checkpoint as ckpt, data, launch, recipe, run_lock, schedule, train_args
from easy_context.world import tiny

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", default=models.TINY, help="hub name, local path, shape:llama2-7b (random init) or tiny")
p.add_argument("--tiny-preset", default="tiny", choices=list(tiny.PRESETS), help="size of the built-in model")
p.add_argument("--dataset", default="tiny", help="hub name, save_to_disk folder, jsonl/parquet file, or tiny "
               "(tiny:answers: loss on the answers only; tiny:answers+0.05: and on 5%% of the other tokens)")
p.add_argument("--text-column", default="text")
p.add_argument("--dataset-split", default="train")
p.add_argument("--seq-length", type=int, default=1024)
p.add_argument("--backend", default="zigzag_ring", choices=[*ec.BACKENDS, "data_parallel", "s2attn"],
               help="s2attn: LongLoRA's shifted sparse attention (training only; contiguous shards)")
p.add_argument("--sp-size", type=int, default=None, help="ranks per sequence-parallel group (default: all)")
p.add_argument("--ulysses-degree", type=int, default=None, help="usp: Ulysses part of --sp-size (rest: ring)")
p.add_argument("--kernel", default=None, help="attention kernel (default: fastest available)")
p.add_argument("--rope-theta", type=float, default=None, help="new RoPE base; default: keep the model's")
p.add_argument("--rope-scaling", default=None, help='e.g. "yarn:factor=8" or a JSON object; default: keep')
p.add_argument("--batch-size", type=int, default=1, help="rows per data-parallel group per micro-step")
p.add_argument("--grad-accum", type=int, default=1)
p.add_argument("--lr", type=float, default=2e-5)
p.add_argument("--warmup-steps", type=int, default=0)
p.add_argument("--schedule", default="constant", choices=schedule.SCHEDULES)
p.add_argument("--min-lr-ratio", type=float, default=0.0)
p.add_argument("--weight-decay", type=float, default=0.1)
p.add_argument("--max-grad-norm", type=float, default=1.0)
p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
p.add_argument("--seed", type=int, default=42)
p.add_argument("--output-dir", default="output/default")
p.add_argument("--checkpoint-every", type=int, default=0, help="save full training state every N steps (0: off)")
p.add_argument("--keep-checkpoints", type=int, default=2)
p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
p.add_argument("--resume-from", default=None, help="continue from this checkpoint: step_N or a path")
p.add_argument("--wandb", default=None, help="wandb project (optional)")
p.add_argument("--no-gradient-checkpointing", type=int, nargs="?", const=-1, default=0, metavar="N",
               help="activation checkpointing off (N: off for the last N layers only: speed for memory)")
p.add_argument("--keep-attention", action="store_true", help="keep attention outputs through the recompute (keep.py)")
p.add_argument("--fuse-pointwise", action="store_true", help="compiled RMSNorm, SwiGLU and RoPE kernels (fused.py)")
p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per logits chunk of the loss")
p.add_argument("--tiled-mlp", type=int, default=0, help="run MLPs in tiles of N tokens (0: off; DeepSpeed only)")
p.add_argument("--offload-activations", type=int, nargs="?", const=-1, default=0, metavar="N",
               help="checkpointed inputs of the first N layers (no N: all) wait in pinned host memory")
p.add_argument("--lora-rank", type=int, default=0, help="LoRA+ (LongLoRA): LoRA on attention + trainable "
               "embeddings and norms (0: full fine-tuning)")
p.add_argument("--lora-alpha", type=float, default=16.0)
p.add_argument("--lora-keep-adapter", action="store_true", help="save the adapter instead of merging it")
p.add_argument("--pose-target", type=int, default=None, help="PoSE: spread positions over this longer window")
p.add_argument("--no-save", action="store_true", help="skip the final model (benchmarks)")
p.add_argument("--time-limit", type=float, default=None, help="minutes: stop after the step that passes it, then save")
p.add_argument("--data-workers", type=int, default=2 if torch.cuda.is_available() else 0, help="DataLoader workers")
args = train_args.check_train_args(p.parse_args())  # nonsense numbers: refused here

# --- process groups and cheap checks: all before any model weights are loaded -------------------------
# gloo on CPU: without it accelerate on a CPU machine believes every process is rank 0 of 1 (and skips DDP).
cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
state = PartialState(**({"backend": "gloo", "cpu": not use_ds} if cpu_group else {}))
world, sp_backend = state.num_processes, args.backend != "data_parallel"
layout_backend = "ring" if args.backend == "s2attn" else args.backend  # S²-Attn shards contiguously
sp_size = (args.sp_size or world) if sp_backend else 1
groups = ec.init_groups(sp_size)
attn_group = ec.attention_group(layout_backend, groups, ulysses_degree=args.ulysses_degree) if sp_backend else None
if sp_backend:
    check_length(args.seq_length, group_layout(ec.get_backend(layout_backend).layout, attn_group), sp_size)
out_dir = args.output_dir
launch.main_decides(lambda: run_lock.acquire(out_dir), state.is_main_process)  # one run per output directory
resume_from = ckpt.resume_point(out_dir, args.resume, args.resume_from, main=state.is_main_process)
if args.model == models.TINY:  # the embedded default, built once into the output directory
    args.model = os.path.join(out_dir, "tiny_init")
    if state.is_main_process:
        tiny.build_world(args.model, preset=args.tiny_preset, max_position_embeddings=args.seq_length, seed=args.seed)
    state.wait_for_everyone()
set_seed(args.seed)
config = models.load_config(args.model, rope_theta=args.rope_theta, rope_scaling=args.rope_scaling,
                            max_position_embeddings=args.seq_length)
if sp_backend:
    ec.check_model_fits_backend(layout_backend, config, sp_size=sp_size, ulysses_degree=args.ulysses_degree)
offload.check_layer_counts(config.num_hidden_layers, offload=args.offload_activations,
                              skip_last=args.no_gradient_checkpointing,  # hidden states: bf16 under DeepSpeed
                              input_bytes=(2 if use_ds else 4) * config.hidden_size * args.batch_size * args.seq_length // sp_size)
tokenizer = None if models.is_shape(args.model) else models.load_tokenizer(args.model)
if args.dataset == "random" or tokenizer is None:  # benchmarks: uniform random tokens, no tokenizer needed
    dataset = data.RandomTokens(config.vocab_size, args.seq_length, seed=args.seed)
else:
    dataset = data.load_training_data(args.dataset, tokenizer, args.seq_length, text_column=args.text_column,
                                      split=args.dataset_split, seed=args.seed, vocab_size=config.vocab_size)
sampler = data.ShardedSampler(len(dataset), groups.dp_rank, groups.dp_size, seed=args.seed)

if sp_backend:  # a 2-layer random copy proves the attention plumbing exact before the real weights load
    ec.self_check_config(config, layout_backend, group=attn_group, kernel=args.kernel, device=state.device, train_len=args.seq_length)

# --- model: RoPE settings, sequence-parallel attention, the loss inside the module DeepSpeed wraps ----------
accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, step_scheduler_with_optimizer=False,
                          mixed_precision="bf16" if torch.cuda.is_available() else "no",
                          kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))])
ds = accelerator.state.deepspeed_plugin  # under ZeRO-3, transformers builds the model partitioned (zero.Init)
# DeepSpeed (bf16 on GPU) keeps its own fp32 master weights; without it, fp32 weights under autocast.
dtype = torch.bfloat16 if ds is not None and torch.cuda.is_available() else torch.float32
if args.tiled_mlp and ds is None and world > 1:
    raise SystemExit("--tiled-mlp needs a DeepSpeed config (DDP's reducer expects one gradient per parameter)")
model = models.load_model(args.model, config=config, dtype=dtype)
offload.setup_checkpointing(model, offload=args.offload_activations, skip_last=args.no_gradient_checkpointing)
if args.keep_attention:
    ec.keep_attention_outputs(model)
if args.fuse_pointwise:
    ec.fuse_pointwise(model)
if args.tiled_mlp:
    ec.apply_tiled_mlp(model, args.tiled_mlp)
if args.lora_rank:
    ec.apply_lora_plus(model, r=args.lora_rank, alpha=args.lora_alpha)
if args.backend == "s2attn":
    ec.apply_s2attn(model, group=groups.sp_group, kernel=args.kernel)
elif sp_backend or args.pose_target:  # PoSE's position jumps need our attention (sdpa reads them as documents)
    ec.apply_seq_parallel_monkey_patch(layout_backend if sp_backend else "ring", model,
                                       group=attn_group if sp_backend else groups.sp_group, kernel=args.kernel)
wrapped = ec.CausalLMWithLoss(model, group=groups.sp_group, chunk_size=args.loss_chunk)
if ds is not None:
    ds.deepspeed_config.update(train_micro_batch_size_per_gpu=args.batch_size, gradient_clipping=args.max_grad_norm)
optimizer = recipe.build_optimizer(model, ds, lr=args.lr, weight_decay=args.weight_decay)
wrapped, optimizer = accelerator.prepare(wrapped, optimizer)

saved = ckpt.load_checkpoint(accelerator, resume_from) if resume_from else dict(step=0, tokens=0, epoch=0, row=0)
step, epoch, row = saved["step"], saved["epoch"], saved["row"]
sampler.set_position(epoch, row)
log_path = os.path.join(out_dir, "log.jsonl")
run_log = recipe.RunLog(log_path, main=accelerator.is_main_process, resume_step=step, wandb_project=args.wandb,
                        run_name=os.path.basename(os.path.abspath(out_dir)), config=vars(args))
if accelerator.is_main_process:
    print(f"world {world} = {groups.dp_size} data-parallel x {sp_size} sequence-parallel ({args.backend}); "
          f"{num_parameters(model) / 1e6:.1f}M parameters; resume from {resume_from}")

# --- training loop -------------------------------------------------------------------------------------
wrapped.train()
loop = recipe.TrainLoop(accelerator, out_dir, run_log, saved, launch.StopRequests(launch.launcher_pid()),
                        tokens_per_step=args.batch_size * args.seq_length * args.grad_accum * groups.dp_size,
                        max_steps=args.max_steps, grad_accum=args.grad_accum, time_limit=args.time_limit,
                        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints)
for epoch, row, (ids, labels) in data.batches(dataset, sampler, args.batch_size, args.seq_length, args.data_workers):
    if loop.done():
        break
    pose_gen = (torch.Generator().manual_seed(args.seed * 1_000_003 + loop.micro * 7919 + groups.dp_rank)
                if args.pose_target else None)  # the same in an SP group
    b = recipe.step_inputs(layout_backend if sp_backend else "data_parallel", ids.to(accelerator.device), attn_group,
                           labels=labels, pose_target=args.pose_target, generator=pose_gen)
    lr = schedule.learning_rate(loop.step, lr=args.lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                                schedule=args.schedule, min_lr_ratio=args.min_lr_ratio)
    schedule.set_learning_rate(optimizer, lr)  # before backward: under DeepSpeed, backward also steps
    with accelerator.accumulate(wrapped):
        loss, value, _ = wrapped(b.input_ids, b.target_ids, b.position_ids)
        if not loop.agree(value):  # a non-finite loss on some rank: no rank takes its backward (nor step)
            break
        accelerator.backward(loss)
        if ds is None and accelerator.sync_gradients:
            accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    loop.end_micro(lr, epoch, row)  # log, checkpoint every N steps
loop.end()  # stopped by a signal or a non-finite loss: checkpoint, say how to resume, exit non-zero
final = None if args.no_save else ckpt.save_model(accelerator, wrapped, tokenizer, out_dir,
                                                  merge_lora=not args.lora_keep_adapter)
if accelerator.is_main_process:
    print(f"done: {loop.step} steps; model -> {final}; log -> {log_path}")
accelerator.end_training()
launch.finish()
