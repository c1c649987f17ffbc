"""run_defaults.py: flags left unset are decided once, from the model, the lengths and the GPU; a flag the user
gave is never overridden."""

from __future__ import annotations

import pytest

from easy_context.hf import models
from easy_context.train.config import ALL_LAYERS, parse_config
from easy_context.train.run_defaults import fuses_kernels, layer_input_bytes, resolve_run_defaults

GIB = 1 << 30
ONE_B = models.shape_config("shape:llama3.2-1b")  # 16 layers, 32 heads of 64


@pytest.mark.parametrize("argv, device, keep", [
    (["--seq-length", "32768"], 139 * GIB, True),                                  # 2.1 GiB of 139
    (["--seq-length", "131072"], 139 * GIB, True),                                 # 8.3 GiB: under 8.7
    (["--seq-length", "262144"], 139 * GIB, False),                                # 16.5 GiB: over 1/16
    (["--seq-length", "262144", "--sp-size", "2", "--backend", "ulysses"], 139 * GIB, True),  # half the tokens
    (["--seq-length", "32768"], 80 * GIB, True),
    (["--seq-length", "131072"], 80 * GIB, False),                                 # 8.3 GiB: over 5
    (["--seq-length", "32768"], None, False),                                      # CPU
    (["--seq-length", "32768", "--no-gradient-checkpointing"], 139 * GIB, False),  # no recompute to save
    (["--seq-length", "32768", "--offload-activations"], 139 * GIB, True),         # offloaded inputs cost no time
    (["--seq-length", "262144", "--offload-activations"], 139 * GIB, False),       # still over 1/16
    (["--seq-length", "32768", "--layers-per-checkpoint", "2"], 139 * GIB, False),
    (["--seq-length", "32768", "--tiled-mlp", "4096"], 139 * GIB, False),
    (["--seq-length", "262144", "--keep-attention"], 139 * GIB, True),             # the user's word stands
    (["--seq-length", "32768", "--no-keep-attention"], 139 * GIB, False),
])
def test_attention_outputs_are_kept_by_default_while_they_take_a_sixteenth_of_the_gpu(argv, device, keep):
    cfg = parse_config(argv)
    sp_size = cfg.sp_size or 1
    resolved = resolve_run_defaults(cfg, ONE_B, sp_size=sp_size, device_bytes=device)
    assert resolved.keep_attention is keep


def test_only_the_unset_flags_change():
    cfg = parse_config(["--seq-length", "32768", "--lr", "3e-4"])
    resolved = resolve_run_defaults(cfg, ONE_B, sp_size=1, device_bytes=139 * GIB)
    assert cfg.keep_attention is None and resolved.keep_attention is True
    unset = ("keep_attention", "bf16_grads", "offload_activations")
    assert {k: v for k, v in vars(resolved).items() if k not in unset} == \
        {k: v for k, v in vars(cfg).items() if k not in unset}


@pytest.mark.parametrize("argv, device, deepspeed, processes, on", [
    ([], 139 * GIB, False, 1, True),                             # one CUDA process, no DeepSpeed: on
    ([], None, False, 1, False),                                 # CPU: float32 matmuls, float32 gradients
    ([], 139 * GIB, True, 1, False),                             # DeepSpeed keeps bf16 gradients itself
    ([], 139 * GIB, False, 2, False),                            # DDP's reducer reads float32 .grad
    (["--grad-accum", "2"], 139 * GIB, False, 1, False),         # sums over micro-steps
    (["--no-bf16-grads"], 139 * GIB, False, 1, False),           # the user's word stands
    (["--bf16-grads"], 139 * GIB, False, 1, True),
])
def test_bf16_gradients_are_on_where_they_are_exact_and_nothing_else_holds_gradients(argv, device, deepspeed,
                                                                                       processes, on):
    # as fast as float32 gradients, with a lower peak (1B shape, one H200: 19.9 against 20.5 GiB at 16K)
    cfg = parse_config(argv)
    resolved = resolve_run_defaults(cfg, ONE_B, sp_size=1, device_bytes=device, deepspeed=deepspeed,
                                    processes=processes)
    assert resolved.bf16_grads is on


@pytest.mark.parametrize("argv, gpu, fused", [
    ([], True, True), ([], False, False),                                      # default: with a CUDA GPU
    (["--fuse-pointwise"], False, True), (["--no-fuse-pointwise"], True, False),  # the user's word stands
])
def test_fused_kernels_default_to_a_cuda_gpu(argv, gpu, fused, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: gpu)
    assert fuses_kernels(parse_config(argv)) is fused


@pytest.mark.parametrize("argv, device, deepspeed, local_processes, host, offload", [
    (["--seq-length", "32768"], 139 * GIB, False, 1, 120 * GIB, ALL_LAYERS),  # 16 inputs of 0.25 GiB: 4 of 30
    (["--seq-length", "131072"], 139 * GIB, False, 1, 120 * GIB, ALL_LAYERS),  # 16 of 1 GiB: 16 of 30
    (["--seq-length", "131072"], 139 * GIB, False, 1, 20 * GIB, 10),           # half of 20 GiB: 10 inputs
    (["--seq-length", "131072"], 139 * GIB, False, 2, 20 * GIB, 5),            # two processes share the host
    (["--seq-length", "131072"], 139 * GIB, False, 1, 1 * GIB, 0),             # not one fits in 0.5 GiB
    (["--seq-length", "131072"], 139 * GIB, False, 1, None, 0),                # host memory unknown
    (["--seq-length", "32768"], None, False, 1, 120 * GIB, 0),                 # CPU: nothing to move off a GPU
    (["--seq-length", "32768"], 139 * GIB, True, 1, 120 * GIB, 0),             # DeepSpeed: its own host budget
    (["--seq-length", "32768", "--no-gradient-checkpointing"], 139 * GIB, False, 1, 120 * GIB, 0),
    (["--seq-length", "131072", "--no-gradient-checkpointing", "4"], 139 * GIB, False, 1, 120 * GIB, ALL_LAYERS),
    (["--seq-length", "131072", "--no-gradient-checkpointing", "4"], 139 * GIB, False, 1, 20 * GIB, 10),
    (["--seq-length", "131072", "--no-gradient-checkpointing", "4"], 139 * GIB, False, 1, 24 * GIB, ALL_LAYERS),
    (["--seq-length", "131072", "--layers-per-checkpoint", "2"], 139 * GIB, False, 1, 20 * GIB, ALL_LAYERS),
    (["--seq-length", "262144", "--layers-per-checkpoint", "2"], 139 * GIB, False, 1, 20 * GIB, 0),  # all or none
    (["--seq-length", "32768", "--offload-activations", "3"], 139 * GIB, False, 1, 120 * GIB, 3),  # the user's word
    (["--seq-length", "32768", "--offload-activations", "0"], 139 * GIB, False, 1, 120 * GIB, 0),
])
def test_layer_inputs_wait_on_the_host_by_default_within_half_of_its_free_memory(
        argv, device, deepspeed, local_processes, host, offload, monkeypatch):
    # free of cost on one H200 (1B: 0.451 against 0.449 s at 16K, 1.183 against 1.186 s at 32K; Qwen2.5-7B at 16K:
    # 1.925 against 1.930 s), and 1-3.5 GiB lower peaks; pinned host memory is the price, so it has a budget
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    cfg = parse_config(argv)
    assert cfg.offload_activations == (None if "--offload-activations" not in argv else offload)
    resolved = resolve_run_defaults(cfg, ONE_B, sp_size=1, device_bytes=device, deepspeed=deepspeed,
                                    host_bytes=host)
    assert resolved.offload_activations == offload


def test_a_layer_input_is_float32_residuals_or_bf16_under_deepspeed_over_the_sequence_ranks():
    cfg = parse_config(["--seq-length", "131072", "--batch-size", "2"])
    assert layer_input_bytes(cfg, ONE_B, sp_size=1, deepspeed=False) == 4 * 2048 * 2 * 131072
    assert layer_input_bytes(cfg, ONE_B, sp_size=4, deepspeed=True) == 2 * 2048 * 2 * 131072 // 4


def test_the_qwen_7b_shape_at_128k_offloads_every_input_on_the_h200s_host():
    # measured that way on one H200 (125 GiB available): 28 float32 inputs of 1.75 GiB, pinned as 2 GiB each, and a
    # host peak of 58.2 GiB; with expandable segments the step fits only so (40.9 s, 132.9 GiB)
    qwen = models.shape_config("shape:qwen2.5-7b")
    cfg = resolve_run_defaults(parse_config(["--seq-length", "131072"]), qwen, sp_size=1, device_bytes=139 * GIB,
                               host_bytes=125 * GIB)
    assert layer_input_bytes(cfg, qwen, sp_size=1, deepspeed=False) == 1.75 * GIB
    assert cfg.offload_activations == ALL_LAYERS
