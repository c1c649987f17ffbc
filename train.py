r"""Long-context fine-tuning of a Hugging Face causal LM with exact sequence-parallel attention.

  # the built-in tiny model on generated retrieval data (no downloads; CPU or GPUs): output/default/
  accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes 2 train.py
  # Llama-2-7B to 256K tokens on 8 GPUs
  accelerate launch --config_file accelerate_configs/zero3_offload.yaml --num_processes 8 train.py \
      --model meta-llama/Llama-2-7b-hf --dataset PY007/slimpajama_llama_tokenized_upsample_4096_chunk_256K \
      --seq-length 262144 --backend zigzag_ring --rope-theta 1e7 --output-dir output/stage3

Processes are split into sequence-parallel groups of --sp-size ranks (default: all); the rest is data parallel.
OUTPUT_DIR gets log.jsonl (one line per step), checkpoints/ (--checkpoint-every) and model/ (the final model).
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

import easy_context as ec
from easy_context.hf import models
from easy_context.hf.causal_lm import num_parameters
from easy_context.hf.plan import apply_plan
from easy_context.memory import offload
from easy_context.parallel.inputs import SeqParallelInputs
from easy_context.parallel.plan import ParallelPlan, resolve_plan
from easy_context.train import checkpoint, data, memory_advice, run_lock, schedule
from easy_context.train.accelerator import training_accelerator
from easy_context.train.bf16_grads import check_bf16_grads
from easy_context.train.config import TrainConfig, parse_config
from easy_context.train.console import announce_op_builds, is_main_process, show_warnings_once
from easy_context.train.distributed import finish, main_decides, run_script
from easy_context.train.loop import TrainLoop
from easy_context.train.prepare import micro_step, prepare_training
from easy_context.train.pose import pose_batch_position_ids
from easy_context.train.run_defaults import fuses_kernels, layer_input_bytes, resolve_run_defaults
from easy_context.train.run_log import log_path
from easy_context.train.stop import StopRequests, launcher_pid
from easy_context.world.default import build_default_world


SMOKE_TEST = ("The built-in model learns the data's format here (loss far below uniform) but not yet to retrieve "
              "needles: that takes the GPU curriculum, OUT=output/proof bash scripts/demo.sh (docs/proof.md).")


def build_model(cfg: TrainConfig, path: str, config, plan: ParallelPlan, dtype: torch.dtype, packed: bool,
                device: torch.device | None = None):
    """The model at ``path`` (a random shape: built on ``device``) with ``cfg``'s memory options, LoRA+ and the plan's
    attention (``packed``: packed rows)."""
    model = models.load_model(path, config=config, dtype=dtype, device=device)
    offload.setup_checkpointing(model, offload=cfg.offload_activations, skip_last=cfg.no_gradient_checkpointing,
                                layers_per_checkpoint=cfg.layers_per_checkpoint, group_recompute=cfg.group_recompute)
    if cfg.keep_attention:
        ec.keep_attention_outputs(model)
    if fuses_kernels(cfg):
        ec.fuse_pointwise(model, required=bool(cfg.fuse_pointwise))  # the default: only what the model has
    if cfg.tiled_mlp:
        ec.apply_tiled_mlp(model, cfg.tiled_mlp)
    if cfg.lora_rank:
        ec.apply_lora_plus(model, r=cfg.lora_rank, alpha=cfg.lora_alpha)
    # data parallel: PoSE's jumps and packed rows need our attention (sdpa: documents; an [S, S] mask)
    return apply_plan(model, plan, position_jumps=bool(cfg.pose_target), packed_documents=packed)


def load_dataset(cfg: TrainConfig, tokenizer, vocab_size: int) -> torch.utils.data.Dataset:
    """The training rows of ``--dataset`` (uniform random tokens for "random" or a model without a tokenizer)."""
    if cfg.dataset == "random" or tokenizer is None:  # benchmarks: no tokenizer needed
        return data.RandomTokens(vocab_size, cfg.seq_length, seed=cfg.seed)
    dataset = data.load_training_data(cfg.dataset, tokenizer, cfg.seq_length, text_column=cfg.text_column,
                                      split=cfg.dataset_split, seed=cfg.seed, vocab_size=vocab_size,
                                      prompt_format=cfg.prompt_format, packing=not cfg.one_example_per_row,
                                      ignore_columns=cfg.ignored_columns)
    if getattr(dataset, "summary", "") and is_main_process():
        print(dataset.summary)
    return dataset


def step_inputs(cfg: TrainConfig, plan: ParallelPlan, ids: torch.Tensor, labels: torch.Tensor | None,
                positions: torch.Tensor | None = None, *, micro_step: int) -> SeqParallelInputs:
    """This rank's part of one full batch (``labels`` None: loss on every token; ``positions``: packed examples'); with
    PoSE, its positions drawn alike on every rank of an SP group, anew for each micro-step and DP group."""
    labels = ids if labels is None else labels.to(ids.device)
    positions = None if positions is None else positions.to(ids.device)
    if cfg.pose_target:
        seed = cfg.seed * 1_000_003 + micro_step * 7919 + plan.groups.dp_rank
        positions = pose_batch_position_ids(ids.shape[0], ids.shape[1], cfg.pose_target, seed=seed,
                                            device=ids.device)
    return plan.shard_inputs(ids, labels, positions, allow_position_skips=bool(cfg.pose_target))


def main(argv: list[str] | None = None) -> None:
    """Train as the command line ``argv`` (default: ``sys.argv[1:]``) says; exits non-zero when stopped early."""
    show_warnings_once(main=is_main_process())  # before DeepSpeed loads: its warnings came once per collective
    cfg = parse_config(argv, description=__doc__)  # nonsense numbers: refused here
    announce_op_builds(main=is_main_process())  # the first DeepSpeed run compiles ops, silently, for minutes

    # --- process groups and cheap checks: all before any model weights are loaded -------------------------
    # gloo on CPU: without it accelerate on a CPU machine believes every process is rank 0 of 1 (and skips DDP).
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    state = PartialState(**({"backend": "gloo", "cpu": not use_ds} if cpu_group else {}))
    plan = resolve_plan(cfg.backend, sp_size=cfg.sp_size, ulysses_degree=cfg.ulysses_degree, kernel=cfg.kernel)
    plan.check_length(cfg.seq_length)
    groups = plan.groups
    out_dir = cfg.output_dir
    main_decides(lambda: run_lock.acquire(out_dir), state.is_main_process)  # one run per output directory
    resume_from = checkpoint.resume_point(out_dir, cfg.resume, cfg.resume_from, main=state.is_main_process)
    model_path = cfg.model_path
    if cfg.model == models.TINY:  # the embedded default, built once into the output directory
        if state.is_main_process:
            build_default_world(model_path, preset=cfg.tiny_preset, max_position_embeddings=cfg.seq_length,
                                seed=cfg.seed)
        state.wait_for_everyone()
    set_seed(cfg.seed)
    config = models.load_config(model_path, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                                max_position_embeddings=cfg.seq_length)
    ec.check_model_fits_plan(config, plan)
    gpu_bytes = torch.cuda.get_device_properties(state.device).total_memory if torch.cuda.is_available() else None
    cfg = resolve_run_defaults(cfg, config, sp_size=groups.sp_size, device_bytes=gpu_bytes, deepspeed=use_ds,
                               processes=state.num_processes, host_bytes=offload.host_available_bytes())
    if cfg.bf16_grads:
        check_bf16_grads(gpu=gpu_bytes is not None, deepspeed=use_ds, processes=state.num_processes)
    num_params = models.parameter_count(config) if use_ds else 0  # for the ZeRO-3 host check; before zero.Init
    input_bytes = layer_input_bytes(cfg, config, sp_size=groups.sp_size, deepspeed=use_ds)
    offload.check_layer_counts(config.num_hidden_layers, offload=cfg.offload_activations,
                               skip_last=cfg.no_gradient_checkpointing, input_bytes=input_bytes,
                               layers_per_checkpoint=cfg.layers_per_checkpoint,
                               layer_types=getattr(config, "layer_types", None))
    tokenizer = None if models.is_shape(model_path) else models.load_tokenizer(model_path)
    dataset = load_dataset(cfg, tokenizer, config.vocab_size)
    packed = data.restarts_positions(dataset)  # packed documents: each attends only to itself
    data.check_packed_rows(dataset, plan, pose=bool(cfg.pose_target), device=state.device)
    sampler = data.ShardedSampler(len(dataset), groups.dp_rank, groups.dp_size, seed=cfg.seed)
    # a 2-layer random copy proves attention and loss exact before the real weights load (S²-Attn's plumbing: ring)
    ec.self_check_config(config, plan.backend if plan.backend.exact else "ring", group=plan.attention_group,
                         kernel=plan.kernel, device=state.device, train_len=cfg.pose_target or cfg.seq_length,
                         packed=packed)

    # --- model: RoPE settings, the plan's attention, the loss inside the module DeepSpeed wraps ---------------
    accelerator = training_accelerator(cfg.grad_accum)
    ds = accelerator.state.deepspeed_plugin  # under ZeRO-3, transformers builds the model partitioned (zero.Init)
    offload.check_zero_offload_host(ds and ds.deepspeed_config, num_params, lora=bool(cfg.lora_rank),
                                    activations=offload.offloaded_input_host_bytes(
                                        config.num_hidden_layers, cfg.offload_activations, cfg.layers_per_checkpoint,
                                        input_bytes, skip_last=cfg.no_gradient_checkpointing))
    # DeepSpeed (bf16 on GPU) keeps its own fp32 master weights; without it, fp32 weights under autocast.
    dtype = torch.bfloat16 if ds is not None and torch.cuda.is_available() else torch.float32
    if cfg.tiled_mlp and ds is None and state.num_processes > 1:
        raise SystemExit("--tiled-mlp needs a DeepSpeed config (DDP's reducer expects one gradient per parameter)")
    device = state.device if ds is None and torch.cuda.is_available() else None  # ZeRO-3: zero.Init places it
    model = build_model(cfg, model_path, config, plan, dtype, packed, device)
    wrapped = ec.CausalLMWithLoss(model, group=groups.sp_group, chunk_size=cfg.loss_chunk,
                                  fused_loss=fuses_kernels(cfg))
    wrapped, optimizer, saved, run_log, grads = prepare_training(accelerator, wrapped, model, cfg, sampler,
                                                                 out_dir, resume_from)
    if accelerator.is_main_process:
        start = f"resuming from {resume_from}" if resume_from else "fresh start"
        print(f"{state.num_processes} processes = {groups.dp_size} data-parallel x {groups.sp_size} "
              f"sequence-parallel ({cfg.backend}); {num_parameters(model) / 1e6:.1f}M parameters; {start}; "
              f"writing to {out_dir}/")

    # --- training loop -------------------------------------------------------------------------------------
    wrapped.train()
    loop = TrainLoop(accelerator, out_dir, run_log, saved, StopRequests(launcher_pid()),
                     tokens_per_step=cfg.batch_size * cfg.seq_length * cfg.grad_accum * groups.dp_size,
                     max_steps=cfg.max_steps, grad_accum=cfg.grad_accum, time_limit=cfg.time_limit,
                     checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                     memory_snapshot=cfg.memory_snapshot)
    with memory_advice.advice_on_out_of_memory(memory_advice.memory_options(cfg, config, sp_size=groups.sp_size,
            deepspeed=use_ds, processes=state.num_processes, host_bytes=offload.host_available_bytes())):
        for epoch, row, (ids, labels, positions) in data.batches(dataset, sampler, cfg.batch_size, cfg.seq_length,
                                                                 cfg.data_workers):
            if loop.done():
                break
            b = step_inputs(cfg, plan, ids.to(accelerator.device), labels, positions, micro_step=loop.micro)
            lr = schedule.learning_rate(loop.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                        schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
            schedule.set_learning_rate(optimizer, lr)  # before backward: under DeepSpeed, backward also steps
            inputs = (b.input_ids, b.target_ids, b.position_ids, b.documents)
            if not micro_step(accelerator, wrapped, optimizer, loop, inputs, cfg.max_grad_norm, grads):
                break  # a non-finite loss on some rank: no rank took its backward (nor step)
            loop.end_micro(lr, epoch, row)  # log, checkpoint every N steps
    loop.end()  # stopped by a signal or a non-finite loss: checkpoint, say how to resume, exit non-zero
    final = None
    if not cfg.no_save:
        final = checkpoint.save_model(accelerator, wrapped, tokenizer, out_dir,
                                      merge_lora=not cfg.lora_keep_adapter)
    if accelerator.is_main_process:
        print(f"done: {loop.step} steps; model -> {final}; log -> {log_path(out_dir)}")
        if cfg.model == models.TINY and not torch.cuda.is_available():
            print(SMOKE_TEST)
    accelerator.end_training()
    finish()


if __name__ == "__main__":
    run_script(main)
