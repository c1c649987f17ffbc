"""Packed documents: boundaries read from position ids, blocks cut along them, the kernels' document calls, and
every sequence-parallel backend equal to running each document alone in one process (out, lse, dq, dk, dv)."""

from __future__ import annotations

import itertools

import pytest
import torch

from easy_context import dist_flash_attention, ring_attention, ulysses_attention, zigzag_ring_attention
from easy_context.attention.documents import (Documents, attention_work, block_pieces, gather_documents,
                                              rank_spans)
from easy_context.attention.kernels import AttentionKernel, get_kernel
from easy_context.attention.layouts import local_ranges, num_chunks, shard
from easy_context.attention.usp import new_usp_group, usp_attention
from tests.helpers.distributed import run_distributed
from tests.helpers.reference import full_attention, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
CHUNK = 4  # tokens per layout chunk in the multi-process cases


# --- documents from position ids and cumulative lengths -------------------------------------------------------


def test_documents_start_where_positions_do_not_increase():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [5, 6, 7, 8, 20, 21, 0, 1]])  # PoSE jump in row 1: no start
    docs = Documents.from_position_ids(pos)
    assert docs.bounds == ((0, 3, 5, 6, 8), (0, 6, 8))
    assert [r for r, _ in docs.row_groups(2)] == [slice(0, 1), slice(1, 2)]
    assert Documents.from_position_ids(torch.arange(8)[None] + 3) is None  # one (offset) document
    shared = Documents.from_position_ids(torch.tensor([[0, 1, 0, 1]]).expand(3, 4))
    assert shared.shared and shared.row_groups(3) == [(slice(None), (0, 2, 4))]
    assert torch.equal(shared.position_ids(), torch.tensor([[0, 1, 0, 1]]))
    assert torch.equal(docs.last_tokens()[0], torch.tensor([0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool))


def test_cu_seqlens_give_the_same_documents_and_bad_ones_raise():
    assert Documents.from_cu_seqlens(torch.tensor([0, 3, 5, 8]), 8) == Documents(((0, 3, 5, 8),))
    assert Documents.from_cu_seqlens([[0, 8], [0, 2, 8]], 8).bounds == ((0, 8), (0, 2, 8))
    for bad in ([0, 3, 3, 8], [1, 8], [0, 5, 3, 8]):
        with pytest.raises(ValueError, match="rise strictly from 0"):
            Documents.from_cu_seqlens(bad, 8)
    with pytest.raises(ValueError, match="end at the sequence length 9"):
        Documents.from_cu_seqlens([0, 4, 8], 9)
    with pytest.raises(ValueError, match="documents cover 8 tokens"):
        Documents(((0, 8),)).check_batch(1, 16, "x")


# --- blocks cut along documents ------------------------------------------------------------------------------


def _pairs_of(piece, q_tokens, k_tokens) -> list[tuple[int, int]]:
    """Global (query, key) token pairs one piece computes."""
    qt, kt = q_tokens[piece.q], k_tokens[piece.k]
    if piece.cu_seqlens is None:
        allowed = torch.ones(len(qt), len(kt), dtype=torch.bool)
        allowed = allowed.tril() if piece.causal else allowed
    else:
        from easy_context.attention.kernels import document_mask
        allowed = document_mask(piece.cu_seqlens, piece.causal)
    return [(int(qt[i]), int(kt[j])) for i, j in allowed.nonzero().tolist()]


def _random_bounds(seq: int, g: torch.Generator, longest: int) -> tuple[int, ...]:
    bounds, pos = [0], 0
    while pos < seq:
        pos = min(seq, pos + int(torch.randint(1, longest + 1, (1,), generator=g)))
        bounds.append(pos)
    return tuple(bounds)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "usp2x2"])
def test_block_pieces_compute_each_allowed_pair_exactly_once(layout, seed):
    g = torch.Generator().manual_seed(seed)
    for world in ((4,) if layout == "usp2x2" else (1, 2, 3)):
        seq = num_chunks(layout, world) * 3
        for longest in (2, 5, seq):
            bounds = _random_bounds(seq, g, longest)
            doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())
            for q_rank, k_rank in itertools.product(range(world), repeat=2):
                q_tokens = torch.cat([torch.arange(a, b) for a, b in local_ranges(seq, layout, q_rank, world)])
                k_tokens = torch.cat([torch.arange(a, b) for a, b in local_ranges(seq, layout, k_rank, world)])
                half = len(q_tokens) // 2
                for q_rows, k_rows, causal in ((slice(None), slice(None), True), (slice(None), slice(None), False),
                                               (slice(half, None), slice(0, half), False),
                                               (slice(0, half), slice(None), False)):
                    if causal and q_rank != k_rank:
                        continue
                    ps = block_pieces(bounds, rank_spans(seq, layout, q_rank, world),
                                      rank_spans(seq, layout, k_rank, world), q_rows, k_rows, causal)
                    got = sorted(p for piece in ps for p in _pairs_of(piece, q_tokens, k_tokens))
                    want = sorted((int(i), int(j)) for i in q_tokens[q_rows] for j in k_tokens[k_rows]
                                  if doc[i] == doc[j] and (not causal or j <= i))
                    assert got == want, (layout, world, bounds, q_rank, k_rank, q_rows, k_rows, causal)
                    for piece in ps:  # a plain piece lies inside one document: no mask needed
                        if piece.cu_seqlens is None:
                            assert len(set(doc[q_tokens[piece.q]].tolist()) | set(doc[k_tokens[piece.k]].tolist())) == 1


# --- load balance ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, world", [("contiguous", 3), ("zigzag", 4), ("usp2x2", 4)])
def test_attention_work_counts_the_unmasked_pairs_each_rank_holds(layout, world, seed):
    g = torch.Generator().manual_seed(seed)
    seq = num_chunks(layout, world) * 5
    for longest in (3, 11, seq):
        bounds = _random_bounds(seq, g, longest)
        doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())
        allowed = (doc[:, None] == doc[None, :]).tril()
        want = [int(shard(allowed, layout, r, world, dim=0).sum()) for r in range(world)]
        assert attention_work(bounds, layout, world) == want
    # one document: zigzag balances causal work exactly, the contiguous split does not
    one = attention_work((0, 64), "zigzag", 4)
    assert len(set(one)) == 1 and sum(one) == 64 * 65 // 2
    assert attention_work((0, 64), "contiguous", 4) == [136, 392, 648, 904]


# --- kernels --------------------------------------------------------------------------------------------------


def per_document_reference(q, k, v, dout, documents: Documents, causal: bool):
    """out, lse, dq, dk, dv (float64) with every document of every row run alone through full attention."""
    res = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, q[..., 0], q, k, v)]
    for b in range(q.shape[0]):
        bounds = documents.bounds[b if len(documents.bounds) > 1 else 0]
        for a, e in zip(bounds, bounds[1:]):
            rows = (slice(b, b + 1), slice(None), slice(a, e))
            for buf, part in zip(res, full_attention(q[rows], k[rows], v[rows], dout[rows], causal)):
                buf[rows] = part
    return res


def _inputs(g, batch, heads, kv_heads, seq, dim):
    return [torch.randn(batch, h, seq, dim, generator=g, dtype=torch.float64)
            for h in (heads, kv_heads, kv_heads, heads)]


@pytest.mark.parametrize("kernel, dtype", [("reference", torch.float64), ("cpu_flash", torch.float32),
                                           ("cpu_flash", torch.float64)])
def test_kernel_document_calls_equal_each_document_alone(kernel, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k_obj = get_kernel(kernel)
    # the fallback of kernels without a varlen path: one call per document
    per_document = type("PerDocument", (type(k_obj),), {"_forward_varlen": AttentionKernel._forward_varlen,
                                                          "_backward_varlen": AttentionKernel._backward_varlen})()
    for causal, (h, hkv) in itertools.product((True, False), ((4, 4), (4, 2), (3, 1))):
        q, k, v, dout = _inputs(g, 2, h, hkv, 19, 8)
        cu = _random_bounds(19, g, 6)
        ref = per_document_reference(q, k, v, dout, Documents((cu,)), causal)
        x = [t.to(dtype) for t in (q, k, v, dout)]
        for forward, backward in ((k_obj.forward_varlen, k_obj.backward_varlen),
                                  (per_document.forward_varlen, per_document.backward_varlen)):
            out, lse = forward(*x[:3], cu, causal, 8 ** -0.5)
            grads = backward(x[3], *x[:3], out, lse, cu, causal, 8 ** -0.5)
            for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
                assert rel_err(got, want) < TOL[dtype], (kernel, causal, h, hkv, name)


# --- every backend over P ranks equals each document alone ----------------------------------------------------


def _cases(seq: int, g: torch.Generator) -> list[tuple[str, Documents, bool]]:
    short = _random_bounds(seq, g, CHUNK - 1)  # many documents shorter than a chunk
    across = (0, 1, seq - CHUNK - 1, seq)  # one document over several shards, with short ones around
    aligned = tuple(range(0, seq + 1, 2 * CHUNK))  # boundaries on chunk edges
    return [("short", Documents((short,)), True), ("across", Documents((across,)), True),
            ("aligned", Documents((aligned,)), True),
            ("rows differ", Documents((short, across)), True), ("non-causal", Documents((short, across)), False)]


def _backends(world: int):
    u = {2: 2, 3: 1, 4: 2}[world]  # USP degrees: 2x1, 1x3, 2x2
    usp = new_usp_group(ulysses_degree=u, ring_degree=world // u)
    return [("ring", ring_attention, "contiguous", None), ("zigzag_ring", zigzag_ring_attention, "zigzag", None),
            ("ulysses", ulysses_attention, "contiguous", None),
            ("dist_flash", dist_flash_attention, "contiguous", None), ("usp", usp_attention, usp.layout, usp)]


def _backends_worker(rank: int, world: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads, dim = 12, 2, 8  # GQA; 12 heads split over Ulysses groups of 2 and 3
    seq = 2 * world * CHUNK
    for name, attn, layout, group in _backends(world):
        for i, (case, docs, causal) in enumerate(_cases(seq, g)):
            kernel, dtype = ("cpu_flash", torch.float32) if i % 2 else ("reference", torch.float64)
            q, k, v, dout = _inputs(g, 2, heads, kv_heads, seq, dim)
            ref = per_document_reference(q, k, v, dout, docs, causal)
            lq, lk, lv = (shard(t, layout, rank, world, dim=2).to(dtype).requires_grad_(True) for t in (q, k, v))
            out, lse = attn(lq, lk, lv, causal=causal, group=group, kernel=kernel, return_lse=True, documents=docs)
            grads = torch.autograd.grad(out, (lq, lk, lv), shard(dout, layout, rank, world, dim=2).to(dtype))
            for what, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
                err = rel_err(got, shard(want, layout, rank, world, dim=2))
                assert err < TOL[dtype], f"{name} {case} {kernel} P={world} rank {rank}: {what} off by {err:.1e}"
    # every rank reads the same documents back from its shard of the position ids
    pos = docs.position_ids().expand(2, -1)
    assert gather_documents(shard(pos, "zigzag", rank, world), "zigzag") == Documents.from_position_ids(pos) == docs
    q = torch.randn(1, 2, CHUNK, 8)
    with pytest.raises(ValueError, match="same shapes"):  # the ranks disagree on the documents: all raise
        ring_attention(q, q, q, documents=Documents(((0, 1 + rank, CHUNK * world),)))
    with pytest.raises(ValueError, match=f"documents cover {CHUNK} tokens"):  # built from a shard, not the row
        zigzag_ring_attention(q, q, q, documents=Documents(((0, 1, CHUNK),)))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_backend_equals_each_document_alone(world, seed):
    # each case: documents shorter than a chunk, one across several shards, boundaries on chunk edges, rows with
    # different documents, non-causal; GQA; float64 reference kernel and float32 CPU flash kernel by turns
    run_distributed(_backends_worker, world, seed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_and_backends_equal_each_document_alone(seed):
    g = torch.Generator().manual_seed(seed)
    _check_cuda_kernels_and_backends(Documents((_random_bounds(1536, g, 400),)), g)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_and_backends_take_one_token_documents():
    # first, between two long ones (alone in its run, so a dense cuDNN call of one token), two in a row, last
    docs = Documents(((0, 1, 300, 301, 700, 701, 702, 1200, 1535, 1536),))
    _check_cuda_kernels_and_backends(docs, torch.Generator().manual_seed(0))


def _check_cuda_kernels_and_backends(docs: Documents, g: torch.Generator) -> None:
    """Every CUDA kernel's document calls, and the one-GPU backends over it, against each document alone."""
    from easy_context.attention.kernels import available_kernels
    from tests.helpers.sp_checks import GPU_TOL

    probe = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    seq = docs.bounds[0][-1]
    failures = []
    for h, hkv, d in ((8, 8, 128), (8, 2, 64)):
        q, k, v, dout = _inputs(g, 2, h, hkv, seq, d)
        ref = per_document_reference(q, k, v, dout, docs, True)
        # HF's layout: [B, S, H, D] buffers viewed [B, H, S, D]
        x = [t.to("cuda", torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, dout)]
        kernels = [n for n in available_kernels(probe, probe) if n != "reference"]
        for kernel in kernels + (["cudnn_mixed"] if "cudnn" in kernels else []):
            kern = get_kernel(kernel.removesuffix("_mixed"))
            if kernel == "cudnn_mixed":  # documents over 150 tokens get cuDNN calls of their own, runs of shorter
                kern.OWN_CALL_WORK = 150 ** 2 * 1024  # ones a varlen flash call (by default all of them do)
            try:
                out, lse = kern.forward_varlen(*x[:3], docs.bounds[0], True, d ** -0.5)
                results = {"kernel": (out, lse, *kern.backward_varlen(x[3], *x[:3], out, lse, docs.bounds[0], True,
                                                                      d ** -0.5))}
                for attn in (zigzag_ring_attention, ulysses_attention, dist_flash_attention):  # one GPU: the pieces
                    xs = [t.detach().clone().requires_grad_(True) for t in x[:3]]
                    out, lse = attn(*xs, causal=True, kernel=kern, return_lse=True, documents=docs)
                    results[attn.__name__] = (out, lse, *torch.autograd.grad(out, xs, x[3]))
            finally:
                kern.__dict__.pop("OWN_CALL_WORK", None)
            for what, got in results.items():
                errs = {n: rel_err(a.cpu(), b) for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
                print(f"GPU {kernel:9s} {what:22s} H={h} Hkv={hkv} D={d} "
                      + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
                if any(e > GPU_TOL[n] for n, e in errs.items()):
                    failures.append(f"{kernel} {what} H={h} Hkv={hkv} D={d}: {errs}")
    assert not failures, "\n".join(failures)


def test_rows_with_their_own_documents_and_one_ring_per_head_group(seed, monkeypatch):
    from easy_context.attention import head_groups
    monkeypatch.setattr(head_groups, "MAX_CALL_ELEMENTS", 1)  # every ring runs once per kv head
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = _inputs(g, 3, 4, 2, 24, 8)
    docs = Documents(((0, 5, 24), (0, 5, 24), (0, 2, 3, 17, 24)))  # rows 0-1 share theirs: one group
    ref = per_document_reference(q, k, v, dout, docs, True)
    for attn in (zigzag_ring_attention, ulysses_attention, dist_flash_attention):
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = attn(*x, return_lse=True, documents=docs, kernel="reference")
        for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *torch.autograd.grad(out, x, dout)),
                                   ref):
            assert rel_err(got, want) < 1e-10, (attn.__name__, name)
