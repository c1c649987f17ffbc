"""cepe/sharded.py: cross-attention over a memory spread over P = 2, 3 ranks (each holds its own chunks) equals the
one-process result, queries replicated or sharded, with padding, uneven shares and ranks without a key; and so
does a whole CEPE training loss (decoder window zigzag-sharded, chunks spread, KL included) and its gradients."""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from easy_context.attention.registry import get_backend
from easy_context.cepe.data import CEPEBatch, rank_inputs, to_chunks
from easy_context.cepe.loss import CEPEWithLoss
from easy_context.cepe.sharded import chunk_range, memory_attention
from easy_context.hf.plan import apply_plan
from easy_context.parallel.groups import ParallelGroups
from easy_context.parallel.inputs import whole_batch
from easy_context.parallel.plan import ParallelPlan
from tests.cepe.tiny import CHUNK, tiny_cepe
from tests.helpers.distributed import run_distributed
from tests.helpers.reference import rel_err

TOL = 1e-9


def plain(q, k, v, mask):
    """Softmax attention of q over all of k, v in float64, padded keys out; a row with no key: zeros."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def check_memory_attention(rank: int, world: int, group, seed: int, queries: str, padded: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    b, h, hkv, d, sq = 2, 4, 2, 8, 3 * world
    sizes = [5 + 2 * r for r in range(world)]  # uneven shares of the memory
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, sum(sizes), d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, sum(sizes), d, generator=g, dtype=torch.float64)
    mask = torch.rand(b, sum(sizes), generator=g) < (0.6 if padded else 2.0)
    if padded:
        mask[1, :sizes[0]] = False  # rank 0 has no key of row 1
        mask[0, 0] = True
    dout = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want = plain(*full, mask)
    want_grads = torch.autograd.grad(want, full, dout)
    start = sum(sizes[:rank])
    mem = slice(start, start + sizes[rank])
    rows = slice(rank * 3, rank * 3 + 3) if queries == "sharded" else slice(None)
    mine = [q[:, :, rows].clone().requires_grad_(), k[:, :, mem].clone().requires_grad_(),
            v[:, :, mem].clone().requires_grad_()]
    out = memory_attention(*mine, mask[:, mem] if padded else None, group=group, queries=queries,
                           kernel="reference")
    got = torch.autograd.grad(out, mine, dout[:, :, rows])
    case = f"rank {rank}/{world} {queries} padded={padded}"
    assert rel_err(out, want[:, :, rows]) < TOL, case
    assert rel_err(got[0], want_grads[0][:, :, rows]) < TOL, case
    assert rel_err(got[1], want_grads[1][:, :, mem]) < TOL, case
    assert rel_err(got[2], want_grads[2][:, :, mem]) < TOL, case


def loss_and_grads(model, group, plan, batch, teacher):
    """Loss value and the trainable gradients summed over the group (the exact gradient, grad_reduction "sum")."""
    wrapped = CEPEWithLoss(model, group=group, kernel="reference", kl_coef=0.5, grad_reduction="sum", chunk_size=5)
    if group is None:
        inputs = whole_batch(batch.input_ids, batch.labels)
        args = (inputs.input_ids, inputs.target_ids, inputs.position_ids, batch.chunk_ids, batch.chunk_mask, *teacher)
    else:
        args = rank_inputs(batch, plan, teacher)
    loss, value, _ = wrapped(*args)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if group is not None:
        for t in grads.values():
            dist.all_reduce(t, group=group)
    return value, grads


def zigzag_plan(group, rank: int, world: int) -> ParallelPlan:
    """The plan of a zigzag-ring SP group ``group`` (exact float64 kernel), no data parallelism."""
    return ParallelPlan(get_backend("zigzag_ring"), ParallelGroups(group, None, rank, world, 0, 1), group, "zigzag",
                        "reference")


def check_cepe_loss(rank: int, world: int, group, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    window, n = 4 * world, 2 * world - 1  # zigzag: 2P pieces of the window; chunks spread unevenly
    ids = torch.randint(128, (2, n * CHUNK - 3 + window), generator=g)
    labels = ids.clone()
    labels[:, -window:-window + 2] = -100
    chunk_ids, chunk_mask = to_chunks(ids[:, :-window], CHUNK)
    batch = CEPEBatch(ids[:, -window:], labels[:, -window:], chunk_ids, chunk_mask, ids)
    probs = torch.softmax(torch.randn(2, window, 128, generator=g, dtype=torch.float64), -1).topk(6, dim=-1)
    teacher = (probs.values, probs.indices)
    ref_value, ref_grads = loss_and_grads(tiny_cepe(seed=seed % 97, dtype=torch.float64), None, None, batch, teacher)
    plan = zigzag_plan(group, rank, world)
    model = tiny_cepe(seed=seed % 97, dtype=torch.float64)
    apply_plan(model.decoder, plan)
    value, grads = loss_and_grads(model, plan.groups.sp_group, plan, batch, teacher)
    assert abs(value.item() - ref_value.item()) < TOL * abs(ref_value.item()), (value, ref_value)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < 1e-8, f"rank {rank}/{world}: {name}"


def worker(rank: int, world: int, seed: int) -> None:
    pair = dist.new_group([0, 1])  # P = 2 on ranks 0 and 1, then P = 3 on all
    for size, group in ((2, pair), (world, dist.group.WORLD)):
        if rank >= size:
            continue
        for i, (queries, padded) in enumerate(itertools.product(("replicated", "sharded"), (False, True))):
            check_memory_attention(rank, size, group, seed + i, queries, padded)
        check_cepe_loss(rank, size, group, seed)


def test_memory_spread_over_2_and_3_ranks_equals_one_process(seed):
    run_distributed(worker, 3, seed)


def test_chunk_shares_are_contiguous_and_cover_every_chunk():
    for n, world in [(5, 3), (8, 2), (3, 3), (2, 4)]:
        shares = [chunk_range(n, r, world) for r in range(world)]
        assert [c for s in shares for c in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
