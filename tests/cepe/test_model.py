"""cepe/model.py: wrapping a decoder's layers changes nothing until a memory is read; only the encoder and the
cross-attention blocks train, the decoder's weights stay bit-identical through training steps; families whose
layers it does not know are refused; the wrapped layers checkpoint one by one."""

from __future__ import annotations

import pytest
import torch

from easy_context.cepe.config import CEPEConfig
from easy_context.cepe.data import split_rows
from easy_context.cepe.loss import CEPEWithLoss
from easy_context.cepe.model import CEPEDecoderLayer, build_cepe, check_wrappable
from easy_context.memory.offload import checkpointed_layers, setup_checkpointing
from easy_context.parallel.inputs import whole_batch
from tests.cepe.tiny import CHUNK, FIELDS, chunks, tiny_cepe
from tests.helpers.tiny_models import FAMILIES, tiny_model

IDS = torch.randint(128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrapped_decoder_computes_the_decoder_exactly(family):
    want = tiny_model(family, 0)(input_ids=IDS).logits
    model = tiny_cepe(family, init="zero")
    assert all(isinstance(layer, CEPEDecoderLayer) for layer in model.decoder.model.layers)
    assert torch.equal(model.decoder(input_ids=IDS).logits, want)  # no memory
    hidden = model(IDS, memory=model.encode(chunks(1, 2, 3)))  # zero init: the blocks add nothing yet
    assert torch.equal(model.decoder.lm_head(hidden), want)
    copied = tiny_cepe(family)(IDS, memory=tiny_cepe(family).encode(chunks(1, 2, 3)))
    assert not torch.equal(tiny_cepe(family).decoder.lm_head(copied), want)  # copy init reads the memory


def test_the_decoders_state_dict_keys_do_not_change():
    keys = set(tiny_model("llama", 0).state_dict())
    wrapped = {k.removeprefix("decoder.") for k in tiny_cepe().state_dict() if k.startswith("decoder.")}
    assert {k for k in wrapped if ".cross_attn." not in k} == keys


def test_cross_attention_only_in_the_last_layers():
    model = tiny_cepe(cross_layers=1)
    assert [layer.cross_attn is not None for layer in model.decoder.model.layers] == [False, True]


def test_only_the_encoder_and_cross_attention_train_and_the_decoder_stays_bit_identical(seed):
    model = tiny_cepe(seed=seed % 50)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("encoder.") or ".cross_attn." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_fn = CEPEWithLoss(model, kl_coef=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        rows = torch.randint(128, (2, 3 * CHUNK + 12), generator=g)
        batch = split_rows(rows, None, stage="main", window=12, chunk_size=CHUNK)
        inputs = whole_batch(batch.input_ids, batch.input_ids)
        loss, _, _ = loss_fn(inputs.input_ids, inputs.target_ids, inputs.position_ids, batch.chunk_ids, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"decoder weight {name} changed"


def test_a_family_whose_layers_it_does_not_know_is_refused():
    gemma = tiny_model("gemma2", 0, attn_implementation="eager")
    with pytest.raises(ValueError, match="cannot wrap the decoder layers of model type 'gemma2'"):
        build_cepe(gemma, CEPEConfig(**FIELDS))
    odd = tiny_model("llama", 0)
    odd.model.layers[1].extra_norm = torch.nn.LayerNorm(64)  # a layer whose forward CEPE does not know
    with pytest.raises(ValueError, match="layer 1 of LlamaForCausalLM .* parts .*extra_norm"):
        check_wrappable(odd)


def test_wrapped_layers_checkpoint_one_by_one_with_the_same_gradients():
    plain, ckpt = tiny_cepe(seed=3), tiny_cepe(seed=3)
    setup_checkpointing(ckpt.decoder)
    setup_checkpointing(ckpt.encoder.model)
    assert checkpointed_layers(ckpt.decoder) == list(ckpt.decoder.model.layers)
    grads = []
    for model in (plain, ckpt):
        model.train()
        memory = model.encode(chunks(2, 2, 3))
        model.decoder.lm_head(model(IDS, memory=memory)).square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
