"""memory_advice.py: at an out-of-memory error the run says which of its memory options are still unused and what
each frees, from the model's sizes and the flags as the defaults resolved them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from easy_context.hf import models
from easy_context.train.config import parse_config
from easy_context.train.memory_advice import advice_on_out_of_memory, memory_options
from easy_context.train.run_defaults import resolve_run_defaults

GIB = 1 << 30
ONE_B = models.shape_config("shape:llama3.2-1b")  # 16 layers of 2048, 32 heads of 64


def _options(argv, *, host=120 * GIB, deepspeed=False, processes=1, sp_size=1, snapshot=None):
    cfg = dataclasses.replace(parse_config(argv), memory_snapshot=snapshot)  # a CUDA-only flag: past its check
    cfg = resolve_run_defaults(cfg, ONE_B, sp_size=sp_size, device_bytes=139 * GIB,
                               deepspeed=deepspeed, processes=processes, host_bytes=host)
    return cfg, memory_options(cfg, ONE_B, sp_size=sp_size, deepspeed=deepspeed, processes=processes,
                               host_bytes=host)


def _flags(options):
    return [o.split(":")[0] for o in options]


@pytest.fixture(autouse=True)
def _one_process_default_allocator(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)


def test_a_128k_run_that_offloaded_what_the_host_budget_allowed_hears_each_option_with_its_size():
    cfg, options = _options(["--seq-length", "131072"], host=20 * GIB)
    assert cfg.offload_activations == 10 and cfg.keep_attention  # half of 20 GiB: 10 inputs of 1 GiB
    kept = 16 * 131072 * 32 * (64 * 2 + 4) / GIB  # bf16 outputs and float32 lse of every layer's 32 heads
    adamw = models.parameter_count(ONE_B) * 8 / GIB
    assert options[:6] == [
        "--offload-activations: the 6 layer inputs still on the GPU (6.0 GiB) wait in pinned host memory (all of "
        "them: 16.0 GiB of host memory, 20 GiB available)",
        f"--no-keep-attention: frees the kept attention outputs ({kept:.1f} GiB); the backward recomputes attention",
        "--layers-per-checkpoint 2: one input kept per two layers (about 3.0 GiB less on the GPU; unset, "
        "--offload-activations then offloads all or none), for a third forward of every other layer",
        "--tiled-mlp 4096: the MLP's activations in tiles of 4096 tokens",
        f"accelerate_configs/zero3_offload_optimizer.yaml: AdamW's state ({adamw:.1f} GiB) waits in host memory",
        "more GPUs per sequence (now 1; accelerate launch --num_processes P, --sp-size P): each holds 1/P of the "
        "tokens",
    ]
    assert _flags(options[6:]) == ["PYTORCH_CUDA_ALLOC_CONF=expandable_segments", "--memory-snapshot step.pickle"]


def test_options_already_taken_are_not_offered():
    _, options = _options(["--seq-length", "131072", "--no-keep-attention"])  # every input fits the host budget
    assert _flags(options) == ["--tiled-mlp 4096", "accelerate_configs/zero3_offload_optimizer.yaml",
                               "more GPUs per sequence (now 1; accelerate launch --num_processes P, --sp-size P)",
                               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments", "--memory-snapshot step.pickle"]


def test_deepspeed_ddp_and_partial_checkpointing_change_what_is_offered(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    snapshot = "step.pickle"
    _, zero3 = _options(["--seq-length", "32768", "--offload-activations", "0"], deepspeed=True, processes=2,
                        sp_size=2, snapshot=snapshot)
    assert _flags(zero3) == ["--offload-activations", "--no-keep-attention", "--layers-per-checkpoint 2",
                             "--tiled-mlp 4096", "more GPUs per sequence (now 2; accelerate launch --num_processes P, "
                             "--sp-size P)"]
    assert "(1.0 GiB)" in zero3[0]  # 16 bf16 inputs of 16K local tokens x 2048
    _, ddp = _options(["--seq-length", "32768", "--no-gradient-checkpointing", "4"], processes=2, sp_size=2,
                      snapshot=snapshot)
    assert "--no-gradient-checkpointing 0" in _flags(ddp) and "--tiled-mlp 4096" not in _flags(ddp)  # DDP: no tiles


def test_an_out_of_memory_error_prints_the_options_and_goes_on(capsys):
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory"):
        with advice_on_out_of_memory(["--offload-activations: frees 6 GiB", "--tiled-mlp 4096: tiles"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    err = capsys.readouterr().err
    assert "The GPU ran out of memory. What lowers this run's peak:\n  --offload-activations: frees 6 GiB\n" \
           "  --tiled-mlp 4096: tiles\n" in err
    with pytest.raises(ValueError):  # any other error: not a word
        with advice_on_out_of_memory(["--tiled-mlp 4096: tiles"]):
            raise ValueError("bad row")
    assert capsys.readouterr().err == ""


# The error of the Qwen2.5-7B shape's step at 128K on one H200 (torch 2.11), the layer inputs in pinned host memory.
FRAGMENTED = ("CUDA out of memory. Tried to allocate 4.62 GiB. GPU 0 has a total capacity of 139.81 GiB of which "
              "1.03 GiB is free. Including non-PyTorch memory, this process has 138.77 GiB memory in use. Of the "
              "allocated memory 119.33 GiB is allocated by PyTorch, and 17.59 GiB is reserved by PyTorch but "
              "unallocated.")


def test_an_error_with_more_held_free_than_it_asked_leads_with_expandable_segments(capsys):
    _, options = _options(["--seq-length", "131072"])
    with pytest.raises(torch.OutOfMemoryError):
        with advice_on_out_of_memory(options):
            raise torch.OutOfMemoryError(FRAGMENTED)
    first = capsys.readouterr().err.split("peak:\n")[1].splitlines()[0]
    assert first.startswith("  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: ")
    assert "17.6 GiB were reserved but unallocated when 4.6 GiB were asked: this alone may be enough" in first


def test_sizes_in_bytes_as_torch_writes_them_below_one_kib_are_read_too(capsys):
    _, options = _options(["--seq-length", "131072"])
    small = FRAGMENTED.replace("Tried to allocate 4.62 GiB", "Tried to allocate 512 bytes")
    with pytest.raises(torch.OutOfMemoryError):
        with advice_on_out_of_memory(options):
            raise torch.OutOfMemoryError(small)
    first = capsys.readouterr().err.split("peak:\n")[1].splitlines()[0]
    assert first.startswith("  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True: ")


@pytest.mark.parametrize("message", [FRAGMENTED.replace("17.59 GiB is reserved", "534.87 MiB is reserved"),
                                     FRAGMENTED.replace("17.59 GiB is reserved", "0 bytes is reserved"),
                                     "CUDA out of memory. Tried to allocate 2.00 GiB"])
def test_an_error_without_fragments_to_use_keeps_the_options_order(capsys, message):
    _, options = _options(["--seq-length", "131072"])
    with pytest.raises(torch.OutOfMemoryError):
        with advice_on_out_of_memory(options):
            raise torch.OutOfMemoryError(message)
    assert capsys.readouterr().err.split("peak:\n")[1].splitlines() == [f"  {o}" for o in options] + [""]
