"""Every backend inside a bf16 Llama on P GPUs vs the same model on one GPU with the full sequence.

    torchrun --nproc_per_node=2 benchmarks/check_hf_gpu.py --seq 8192

Per backend: the startup self-check, then the loss and the parameter gradients (averaged over the
sequence-parallel ranks, as DDP/DeepSpeed would) against the unpatched model on the whole sequence.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import transformers

from easy_context import (apply_seq_parallel_monkey_patch, causal_lm_loss, new_usp_group,
                          prepare_seq_parallel_inputs, self_check, shift_labels)


def build(seed: int):
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                   max_position_embeddings=65536, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--backends", default="zigzag_ring,ring,ulysses,dist_flash,usp:2x1,usp:1x2")
    a = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(32000, (1, a.seq), generator=g).cuda()
    labels = ids.clone()
    labels[:, : a.seq // 3] = -100  # ranks hold different numbers of valid targets

    ref = build(0)
    ref_loss = causal_lm_loss(ref, ids, shift_labels(labels))
    ref_loss.loss.backward()
    ref_grad = flat_grads(ref)
    for name in a.backends.split(","):
        group, backend = None, name
        if name.startswith("usp:"):
            u, r = map(int, name[4:].split("x"))
            group, backend = new_usp_group(ulysses_degree=u, ring_degree=r), "usp"
        model = apply_seq_parallel_monkey_patch(backend, build(0), group=group)
        errs = self_check(model, seq_len=1024)
        batch = prepare_seq_parallel_inputs(backend, ids, labels, group=group)
        loss = causal_lm_loss(model, batch.input_ids, batch.target_ids, batch.position_ids)
        loss.loss.backward()
        grad = flat_grads(model)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad /= world
        g_err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
        if rank == 0:
            print(f"{name:12s} self_check attn={errs['attention']:.1e} logits={errs['logits']:.1e}  "
                  f"loss {loss.value.item():.5f} vs {ref_loss.value.item():.5f}  grad rel err {g_err:.2e}",
                  flush=True)
        del model
        torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
