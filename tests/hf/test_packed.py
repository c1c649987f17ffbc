"""Packed documents in a Hugging Face model: the loss and every parameter gradient of a packed batch, sequence-
parallel with every backend (and one process, data parallel), equal those of each document run alone through
the model's own attention; the documents reach the activation-checkpoint recompute; the self-check proves it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from easy_context.attention.usp import new_usp_group
from easy_context.hf.attention import use_sequence_parallel_attention
from easy_context.hf.causal_lm import CausalLMWithLoss, causal_lm_loss
from easy_context.hf.plan import apply_plan
from easy_context.hf.self_check import self_check
from easy_context.parallel.inputs import prepare_seq_parallel_inputs, shift_labels
from easy_context.parallel.plan import resolve_plan
from tests.helpers.distributed import run_distributed
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, tiny_model

TOL = 1e-5  # float32, relative
SEQ = 32
# row 0: a one-token document and one across both halves of the sequence; row 1: two documents
CU_SEQLENS = [[0, 3, 13, 14, 32], [0, 20, 32]]


def _each_document_alone(seed: int, ids: torch.Tensor, labels: torch.Tensor):
    """Loss (token mean over all documents) and parameter gradients with every document a forward of its own."""
    model = tiny_model("llama", seed)
    total, count = 0.0, 0
    for row, bounds in enumerate(CU_SEQLENS):
        for a, b in zip(bounds, bounds[1:]):
            logits = model(input_ids=ids[row:row + 1, a:b]).logits[0]
            targets = shift_labels(labels[row:row + 1, a:b])[0]
            total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
            count += int((targets != -100).sum())
    loss = total / count
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check(what: str, value, model, ref_loss, ref_grads, group=None) -> None:
    assert rel_err(value, ref_loss) < TOL, f"{what}: loss {value} != {ref_loss}"
    for n, p in model.named_parameters():
        if group is not False:
            dist.all_reduce(p.grad, group=group)  # the "sum" convention: rank shares add up
        err = rel_err(p.grad, ref_grads[n])
        assert err < TOL, f"{what}: gradient of {n} off by {err:.1e}"


def _sequence_parallel_worker(rank: int, world: int, seed: int) -> None:
    ids, labels = batch(seed, 2, SEQ)
    ref_loss, ref_grads = _each_document_alone(seed, ids, labels)
    # every backend's documents are checked against the attention reference in tests/attention/test_documents.py;
    # here the model plumbing: documents handed over or read from the restarting positions, with and without the
    # activation-checkpoint recompute (which must see them too)
    for backend, handed_over, checkpointing in (("zigzag_ring", False, True), ("ulysses", True, False),
                                                ("usp", False, False), ("dist_flash", True, True)):
        group = new_usp_group(ulysses_degree=2, ring_degree=1) if backend == "usp" else None
        model = tiny_model("llama", seed)
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.train()
        use_sequence_parallel_attention(backend, model, group)
        inp = prepare_seq_parallel_inputs(backend, ids, labels, cu_seqlens=CU_SEQLENS, group=group)
        docs = inp.documents if handed_over else None
        out = causal_lm_loss(model, inp.input_ids, inp.target_ids, inp.position_ids, grad_reduction="sum",
                             documents=docs)
        out.loss.backward()
        _check(f"{backend} on {world} ranks", out.value, model, ref_loss, ref_grads)
    # the training step's module, given the packed batch as train.py gives it
    model = use_sequence_parallel_attention("ring", tiny_model("llama", seed))
    inp = prepare_seq_parallel_inputs("ring", ids, labels, inp.documents.position_ids())
    loss, value, _ = CausalLMWithLoss(model, grad_reduction="sum")(inp.input_ids, inp.target_ids, inp.position_ids,
                                                                   inp.documents)
    loss.backward()
    _check("CausalLMWithLoss", value, model, ref_loss, ref_grads)
    assert self_check(model, packed=True)["packed"] < 1e-4


def test_packed_batch_under_sequence_parallelism_equals_each_document_alone(seed):
    run_distributed(_sequence_parallel_worker, 2, seed)


@pytest.mark.parametrize("packed_documents", [True, False])
def test_data_parallel_packed_batch_equals_each_document_alone(packed_documents, seed):
    # packed_documents: the exact ring on one rank (varlen calls); without it, sdpa's own packed-sequence mask
    ids, labels = batch(seed, 2, SEQ)
    ref_loss, ref_grads = _each_document_alone(seed, ids, labels)
    plan = resolve_plan("data_parallel")
    model = apply_plan(tiny_model("llama", seed), plan, packed_documents=packed_documents)
    assert (model.config._attn_implementation != "sdpa") == packed_documents
    b = plan.shard_inputs(ids, labels, cu_seqlens=CU_SEQLENS)
    out = causal_lm_loss(model, b.input_ids, b.target_ids, b.position_ids, documents=b.documents)
    out.loss.backward()
    _check(f"data parallel (packed_documents={packed_documents})", out.value, model, ref_loss, ref_grads, group=False)
