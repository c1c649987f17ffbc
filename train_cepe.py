r"""CEPE training: a frozen decoder learns to read a long context through a small parallel encoder and
cross-attention blocks (only those train). Stage "warmup": the encoder reads the decoder's own window; stage
"main": it reads the context chunks before the window. --kl-coef adds CEPED's distillation from a teacher.

  # the built-in model trained at a 256-token window (OUTPUT/model of the main training job), warmup then main
  accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 train_cepe.py \
      --model output/default/model --stage warmup --window 256 --chunk-size 64 --output-dir output/cepe_warmup
  accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 2 train_cepe.py \
      --cepe output/cepe_warmup/model --window 256 --chunk-size 64 --context-chunks 16 --output-dir output/cepe
  # Llama-2-7B, the paper's main stage: 4K window + 16 x 256 context tokens, ZeRO-3 on 8 GPUs
  accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 8 train_cepe.py \
      --model meta-llama/Llama-2-7b-hf --encoder-layers 24 --window 4096 --context-chunks 16 \
      --dataset DATASET --grad-accum 16 --output-dir output/cepe_llama2

--backend zigzag_ring (or another sequence-parallel backend) splits each window over --sp-size ranks and the
encoder chunks with it: each rank encodes its own, and the cross-attention merges exactly over the group.
OUTPUT_DIR gets log.jsonl, checkpoints/ (--checkpoint-every) and model/ (the CEPE model: its config, the encoder's
and cross-attention weights, the tokenizer; --save-decoder adds the frozen decoder's weights).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from accelerate import PartialState
from accelerate.utils import set_seed

import easy_context as ec
from easy_context.cepe import config as cepe_config, data as cepe_data
from easy_context.cepe.distill import window_topk
from easy_context.cepe.io import load_cepe, read_cepe_config, save_cepe
from easy_context.cepe.loss import CEPEWithLoss, describe_gain, memory_gain
from easy_context.cepe.model import build_cepe
from easy_context.cepe.train_config import CEPETrainConfig, cepe_config as flags_config, parse_cepe_config
from easy_context.hf import models
from easy_context.hf.causal_lm import num_parameters
from easy_context.hf.plan import apply_plan
from easy_context.memory import offload
from easy_context.parallel.plan import resolve_plan
from easy_context.train import checkpoint, data, run_lock, schedule
from easy_context.train.accelerator import training_accelerator
from easy_context.train.console import announce_op_builds, is_main_process, show_warnings_once
from easy_context.train.distributed import finish, main_decides, run_script
from easy_context.train.loop import TrainLoop
from easy_context.train.prepare import micro_step, prepare_training
from easy_context.train.run_log import log_path
from easy_context.train.stop import StopRequests, launcher_pid
from easy_context.world.default import build_default_world


def check_model(cfg: CEPETrainConfig, decoder_path: str, fields, sp_size: int):
    """From configs only, before any weights load: the decoder's config and the resolved CEPE fields, or a
    SystemExit saying what to change (family, widths, lengths, teacher)."""
    try:
        decoder_config = models.load_config(decoder_path)
        fields = cepe_config.resolve_config(dataclasses.replace(fields, chunk_size=cfg.chunk_size), decoder_config)
        cepe_config.check_lengths(fields, decoder_config, window=cfg.window, context_chunks=cfg.context_chunks,
                                  chunk_size=cfg.chunk_size, stage=cfg.stage, sp_size=sp_size)
        if cfg.kl_coef:
            tokens = cepe_data.row_length(cfg.stage, window=cfg.window, context_chunks=cfg.context_chunks,
                                          chunk_size=cfg.chunk_size)
            cepe_config.check_teacher(models.load_config(cfg.teacher or decoder_path), decoder_config, tokens=tokens)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return decoder_config, fields


def main(argv: list[str] | None = None) -> None:
    """Train as the command line ``argv`` (default: ``sys.argv[1:]``) says; exits non-zero when stopped early."""
    show_warnings_once(main=is_main_process())
    cfg = parse_cepe_config(argv, description=__doc__)
    announce_op_builds(main=is_main_process())

    # --- process groups and cheap checks: all before any weights load --------------------------------------
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    state = PartialState(**({"backend": "gloo", "cpu": not use_ds} if cpu_group else {}))
    plan = resolve_plan(cfg.backend, sp_size=cfg.sp_size, ulysses_degree=cfg.ulysses_degree, kernel=cfg.kernel)
    plan.check_length(cfg.window)
    groups, out_dir = plan.groups, cfg.output_dir
    main_decides(lambda: run_lock.acquire(out_dir), state.is_main_process)
    resume_from = checkpoint.resume_point(out_dir, cfg.resume, cfg.resume_from, main=state.is_main_process)
    if cfg.cepe:
        fields, decoder_path = main_decides(lambda: read_cepe_config(cfg.cepe), state.is_main_process)
    else:
        fields, decoder_path = flags_config(cfg), cfg.model_path
        if cfg.model == models.TINY and state.is_main_process:
            build_default_world(decoder_path, preset=cfg.tiny_preset, max_position_embeddings=cfg.window,
                                seed=cfg.seed)
        state.wait_for_everyone()
    decoder_config, fields = check_model(cfg, decoder_path, fields, groups.sp_size)
    ec.check_model_fits_plan(decoder_config, plan)
    tokenizer = None if models.is_shape(decoder_path) else models.load_tokenizer(decoder_path)
    row_len = cepe_data.row_length(cfg.stage, window=cfg.window, context_chunks=cfg.context_chunks,
                                   chunk_size=cfg.chunk_size)
    if cfg.dataset == "random" or tokenizer is None:  # benchmarks: random tokens, no tokenizer needed
        dataset = data.RandomTokens(decoder_config.vocab_size, row_len, seed=cfg.seed)
    else:
        dataset = data.load_training_data(cfg.dataset, tokenizer, row_len, text_column=cfg.text_column,
                                          split=cfg.dataset_split, seed=cfg.seed, vocab_size=decoder_config.vocab_size)
    sampler = data.ShardedSampler(len(dataset), groups.dp_rank, groups.dp_size, seed=cfg.seed)
    if plan.sequence_parallel:
        ec.self_check_config(decoder_config, plan.backend, group=plan.attention_group, kernel=plan.kernel,
                             device=state.device, train_len=cfg.window)

    # --- model: frozen decoder + encoder + cross-attention, the loss inside the module DeepSpeed wraps ----------
    # Built whole before the Accelerator exists: under it, transformers would build the decoder ZeRO-3-partitioned,
    # and the cross-attention's copy init needs its weights (DeepSpeed partitions the whole model in prepare).
    dtype = torch.bfloat16 if use_ds and torch.cuda.is_available() else torch.float32
    set_seed(cfg.seed)
    if cfg.cepe:
        model = load_cepe(cfg.cepe, dtype=dtype)
    else:
        model = build_cepe(models.load_model(decoder_path, config=decoder_config, dtype=dtype), fields)
    model.cepe_config = fields  # this run's chunk length becomes the saved model's
    apply_plan(model.decoder, plan)
    if not cfg.no_gradient_checkpointing:
        offload.setup_checkpointing(model.decoder)
        offload.setup_checkpointing(model.encoder.model)
    sp_group = groups.sp_group if plan.sequence_parallel else None
    wrapped = CEPEWithLoss(model, group=sp_group, kernel=plan.kernel, chunk_size=cfg.loss_chunk, lm_coef=cfg.lm_coef,
                           kl_coef=cfg.kl_coef, kl_rest=cfg.kl_rest)
    teacher = None
    if cfg.kl_coef:  # the original model, reading context + window in full on every rank (never trained)
        teacher = models.load_model(cfg.teacher or decoder_path, dtype=dtype).to(state.device).eval()
        teacher.requires_grad_(False)
    accelerator = training_accelerator(cfg.grad_accum)
    wrapped, optimizer, saved, run_log, grads = prepare_training(accelerator, wrapped, model, cfg, sampler,
                                                                 out_dir, resume_from)
    if accelerator.is_main_process:
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        start = f"resuming from {resume_from}" if resume_from else "fresh start"
        print(f"CEPE {cfg.stage} stage: {state.num_processes} processes = {groups.dp_size} data-parallel x "
              f"{groups.sp_size} sequence-parallel ({cfg.backend}); {num_parameters(model) / 1e6:.1f}M parameters, "
              f"{trainable / 1e6:.1f}M trainable (encoder + cross-attention); window {cfg.window} + "
              f"{row_len - cfg.window if cfg.stage == 'main' else cfg.window} encoder tokens; {start}; writing to "
              f"{out_dir}/")

    # --- training loop -------------------------------------------------------------------------------------
    wrapped.train()
    loop = TrainLoop(accelerator, out_dir, run_log, saved, StopRequests(launcher_pid()),
                     tokens_per_step=cfg.batch_size * row_len * cfg.grad_accum * groups.dp_size,
                     max_steps=cfg.max_steps, grad_accum=cfg.grad_accum, time_limit=cfg.time_limit,
                     checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints)
    inputs = None
    for epoch, row, (ids, labels, *_) in data.batches(dataset, sampler, cfg.batch_size, row_len, cfg.data_workers):
        if loop.done():
            break
        batch = cepe_data.split_rows(ids, labels, stage=cfg.stage, window=cfg.window, chunk_size=cfg.chunk_size,
                                     device=accelerator.device)
        top = None if teacher is None else window_topk(teacher, batch.teacher_ids,
                                                       cfg.window, cfg.kl_topk, chunk_size=cfg.loss_chunk)
        inputs = cepe_data.rank_inputs(batch, plan, top)
        lr = schedule.learning_rate(loop.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                                    schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
        schedule.set_learning_rate(optimizer, lr)  # before backward: under DeepSpeed, backward also steps
        if not micro_step(accelerator, wrapped, optimizer, loop, inputs, cfg.max_grad_norm, grads):
            break  # a non-finite loss on some rank: no rank took its backward (nor step)
        loop.end_micro(lr, epoch, row)
    loop.end()
    if inputs is not None:  # does the memory help yet? (a warmup that never leaves the decoder's loss has not)
        gain = memory_gain(wrapped, inputs)
        if accelerator.is_main_process:
            print(describe_gain(cfg.stage, *gain))
    final = None
    if not cfg.no_save:
        weights = accelerator.get_state_dict(wrapped)  # every rank must call it under ZeRO-3
        final = os.path.join(out_dir, "model")
        if accelerator.is_main_process:
            weights = {k.removeprefix("model."): v for k, v in weights.items()}
            save_cepe(accelerator.unwrap_model(wrapped).model, final, decoder_source=decoder_path,
                      state_dict=weights, tokenizer=tokenizer, save_decoder=cfg.save_decoder)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        print(f"done: {loop.step} steps; CEPE model -> {final}; log -> {log_path(out_dir)}")
    accelerator.end_training()
    finish()


if __name__ == "__main__":
    run_script(main)
