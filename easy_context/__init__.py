"""easy_context: exact sequence-parallel attention for long-context training on PyTorch's own kernels.

Self-contained: copy this folder into another codebase; it imports only torch at import time
(transformers, used by ``hf``, and flash-attn are imported inside the functions that need them).
"""

from .attention.registry import BACKENDS, Backend, backend_layout, get_backend
from .attention.dist_flash import dist_flash_attention
from .memory.fused import fuse_pointwise
from .parallel.groups import ParallelGroups, attention_group, init_groups
from .hf.attention import (apply_seq_parallel_monkey_patch, register_all, register_attention,
                           use_sequence_parallel_attention)
from .hf.causal_lm import CausalLMWithLoss, causal_lm_loss
from .hf.compatibility import check_model_fits_backend, check_model_fits_plan
from .hf.self_check import self_check, self_check_config
from .parallel.inputs import SeqParallelInputs, prepare_seq_parallel_inputs, shift_labels
from .memory.keep import keep_attention_outputs
from .attention.kernels import AttentionKernel, available_kernels, get_kernel, select_kernel
from .attention.documents import Documents, attention_work
from .attention.layouts import gather, local_ranges, position_ids, shard, unshard
from .hf.lora import apply_lora_plus, load_lora_model, save_lora_model
from .parallel.loss import SPLoss, chunked_cross_entropy, sequence_parallel_cross_entropy
from .attention.merge import merge_
from .eval.needle import NeedleResults, NeedleTask, answer_predictions, haystack_tokens
from .memory.offload import OffloadedCheckpoint, enable_offloaded_checkpointing, setup_checkpointing, skip_checkpointing
from .eval.model import load_eval_model
from .eval.perplexity import evaluate_perplexity, sequence_nll
from .train.pose import pose_position_ids
from .attention.ring import ring_attention
from .attention.s2attn import s2_attention
from .hf.s2attn import apply_s2attn, register_s2attn
from .memory.tiled_mlp import apply_tiled_mlp
from .attention.ulysses import ulysses_attention
from .attention.usp import USPGroup, new_usp_group, usp_attention
from .attention.zigzag import zigzag_ring_attention

__all__ = [
    "BACKENDS", "Backend", "backend_layout", "get_backend",
    "AttentionKernel", "available_kernels", "get_kernel", "select_kernel",
    "gather", "local_ranges", "position_ids", "shard", "unshard",
    "merge_", "ring_attention", "zigzag_ring_attention", "Documents", "attention_work",
    "ulysses_attention", "usp_attention", "new_usp_group", "USPGroup", "dist_flash_attention",
    "ParallelGroups", "init_groups", "SeqParallelInputs", "prepare_seq_parallel_inputs", "shift_labels",
    "SPLoss", "chunked_cross_entropy", "sequence_parallel_cross_entropy",
    "s2_attention", "register_s2attn", "apply_s2attn", "pose_position_ids",
    "apply_lora_plus", "save_lora_model", "load_lora_model",
    "use_sequence_parallel_attention", "apply_seq_parallel_monkey_patch", "causal_lm_loss", "CausalLMWithLoss",
    "check_model_fits_backend", "check_model_fits_plan",
    "self_check_config", "attention_group", "register_all", "register_attention", "self_check",
    "apply_tiled_mlp", "OffloadedCheckpoint", "enable_offloaded_checkpointing",
    "setup_checkpointing", "skip_checkpointing", "keep_attention_outputs",
    "fuse_pointwise",
    "NeedleTask", "NeedleResults", "answer_predictions", "haystack_tokens",
    "evaluate_perplexity", "sequence_nll", "load_eval_model",
]
