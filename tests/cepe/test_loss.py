"""cepe/loss.py: the training loss is lm_coef x the token-mean cross entropy of the decoder's targets (the model's
own logits, reading the memory) plus kl_coef x the mean top-k KL to the teacher; without teacher top-k a
distillation run is refused. (Spread over ranks it equals this: test_sharded.py.)"""

from __future__ import annotations

import pytest
import torch

from easy_context.cepe.distill import teacher_topk, topk_kl
from easy_context.cepe.loss import CEPEWithLoss, describe_gain, memory_gain
from easy_context.parallel.inputs import whole_batch
from tests.cepe.tiny import chunks, tiny_cepe


def test_loss_is_the_weighted_cross_entropy_plus_kl(seed):
    model = tiny_cepe(seed=seed % 100, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(128, (2, 10), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    enc = chunks(seed, 2, 3)
    probs, top = teacher_topk(torch.randn(2, 10, 64, generator=g, dtype=torch.float64), model.head().weight, 6)
    inputs = whole_batch(ids, labels)
    wrapped = CEPEWithLoss(model, lm_coef=0.7, kl_coef=0.3, kl_rest="drop", chunk_size=4)
    loss, value, count = wrapped(inputs.input_ids, inputs.target_ids, inputs.position_ids, enc, None, probs, top)
    hidden = model(ids, memory=model.encode(enc))
    logits = model.decoder.lm_head(hidden)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1))
    kl = topk_kl(hidden, model.head().weight, probs.double(), top, rest="drop").mean()
    want = 0.7 * ce + 0.3 * kl
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(value, want.detach(), rtol=1e-10, atol=1e-12)
    assert int(count) == int((labels[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="kl_coef > 0 needs the teacher's top-k"):
        wrapped(inputs.input_ids, inputs.target_ids, inputs.position_ids, enc)


def test_without_chunks_it_is_the_decoder_alone_and_the_gain_compares_both(seed):
    model = tiny_cepe(seed=seed % 100, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(128, (2, 10), generator=g)
    inputs = whole_batch(ids, ids)
    args = (inputs.input_ids, inputs.target_ids, inputs.position_ids, chunks(seed, 2, 3), None)
    wrapped = CEPEWithLoss(model, chunk_size=4)
    logits = model.decoder.lm_head(model(ids, memory=None))
    alone = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    plain = model.decoder(input_ids=ids, labels=ids).loss  # the wrapped layers without a memory: the HF model's
    torch.testing.assert_close(alone.float(), plain, rtol=1e-6, atol=1e-7)  # HF takes its loss in float32
    torch.testing.assert_close(wrapped(*args[:3], None)[1], alone, rtol=1e-10, atol=1e-12)
    with_memory, without = memory_gain(wrapped, args)
    assert without == pytest.approx(float(alone), rel=1e-10)
    assert with_memory == pytest.approx(float(wrapped(*args)[1]), rel=1e-10) and with_memory != without


def test_a_zero_initialized_memory_gains_nothing_until_it_trains(seed):
    model = tiny_cepe(seed=seed % 100, dtype=torch.float64, init="zero")
    ids = torch.randint(128, (2, 10), generator=torch.Generator().manual_seed(seed))
    inputs = whole_batch(ids, ids)
    args = (inputs.input_ids, inputs.target_ids, inputs.position_ids, chunks(seed, 2, 3), None)
    with_memory, without = memory_gain(CEPEWithLoss(model, chunk_size=4), args)
    assert with_memory == pytest.approx(without, rel=1e-12)


def test_the_gain_line_says_what_to_do_when_the_memory_does_not_help():
    assert describe_gain("warmup", 0.5, 1.0) == ("the encoder's memory on the last batch: loss 0.5000, the decoder "
                                                 "alone 1.0000")
    assert "train the warmup longer or at a higher --lr" in describe_gain("warmup", 0.999, 1.0)
    assert "evidence lies in the context chunks" in describe_gain("main", 1.2, 1.0)
