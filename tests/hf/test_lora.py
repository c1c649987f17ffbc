"""LoRA+ (LongLoRA): only LoRA A/B on q/k/v/o, the embeddings and the norms train, and an optimizer over all
parameters changes exactly those; the merged checkpoint (from the model or from a gathered state dict with
the model's own weights gone, as under ZeRO-3) loads with from_pretrained and gives the adapted model's
logits; the unmerged adapter reloads; LoRA+, S²-Attn and PoSE train together."""

from __future__ import annotations

import re

import pytest
import torch

from easy_context.hf.lora import apply_lora_plus, load_lora_model, save_lora_model
from easy_context.hf.s2attn import apply_s2attn
from tests.helpers.reference import rel_err
from tests.helpers.tiny_models import batch, pose_training_losses, tiny_model

LORA = re.compile(r"\.self_attn\.[qkvo]_proj\.lora_[AB]\.default\.weight$")


def _expected_trainable(model) -> set[str]:
    """LoRA A/B of the attention projections, embeddings (input, and output unless tied) and norm weights."""
    names = {n for n, _ in model.named_parameters()}
    return {n for n in names if LORA.search(n) or "embed_tokens" in n or n.startswith("lm_head") or "norm" in n}


def _train(model, ids, labels, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)  # every parameter offered: frozen ones get no gradient
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])  # untied, tied embeddings, q/k norms
def test_trains_exactly_the_intended_parameters(family, seed):
    model = apply_lora_plus(tiny_model(family, seed))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _expected_trainable(model)
    assert sum(bool(LORA.search(n)) for n in trainable) == 2 * 4 * model.config.num_hidden_layers
    assert not any(re.search(r"(mlp|base_layer)", n) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train(model, *batch(seed, 2, 32))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # LoRA A moves from the second step on (B starts at zero)
    assert losses[-1] < losses[0], losses


def _adapted(family, seed):
    model = apply_lora_plus(tiny_model(family, seed), r=4, alpha=16)
    _train(model, *batch(seed, 2, 32))
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_merged_checkpoint_loads_with_from_pretrained(family, seed, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = batch(seed + 1, 2, 32)[0]
    model = _adapted(family, seed)
    expected = _logits(model, ids)
    save_lora_model(model, str(tmp_path / "own"))  # from the model's own weights

    gathered = {k: v.clone() for k, v in model.state_dict().items()}  # what accelerator.get_state_dict returns
    for p in model.parameters():
        p.data = torch.empty(0)  # ZeRO-3: the local parameters are empty partitions
    save_lora_model(model, str(tmp_path / "gathered"), state_dict=gathered)
    wrapped = {"model." + k: v for k, v in gathered.items()}  # gathered from hf.CausalLMWithLoss(model)
    save_lora_model(model, str(tmp_path / "wrapped"), state_dict=wrapped)

    for sub in ("own", "gathered", "wrapped"):
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / sub))
        assert not any("lora" in n or "base_layer" in n for n, _ in loaded.named_parameters())
        assert rel_err(_logits(loaded, ids), expected) < 1e-5, sub

    # The merge itself: W + (alpha / r) * B @ A.
    files = load_file(str(tmp_path / "gathered" / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj"
    a, b, w = (gathered[f"{name}.{p}"] for p in ("lora_A.default.weight", "lora_B.default.weight", "base_layer.weight"))
    assert b.abs().max() > 0 and rel_err(files[f"{name}.weight"], w + 16 / 4 * b @ a) < 1e-6

    half = {k: v.bfloat16() for k, v in gathered.items()}  # a bf16 run stays bf16
    save_lora_model(model, str(tmp_path / "bf16"), state_dict=half)
    assert load_file(str(tmp_path / "bf16" / "model.safetensors"))[f"{name}.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unmerged_adapter_reloads(family, seed, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    ids = batch(seed + 1, 2, 32)[0]
    model = _adapted(family, seed)
    save_lora_model(model, str(tmp_path), merge=False)
    assert rel_err(_logits(load_lora_model(tiny_model(family, seed), str(tmp_path)), ids), _logits(model, ids)) < 1e-6
    # A standard peft adapter directory; the embeddings and norms live beside it.
    peft_model = PeftModel.from_pretrained(tiny_model(family, seed), str(tmp_path))
    unexpected = peft_model.get_base_model().load_state_dict(load_file(str(tmp_path / "trainable_params.safetensors")),
                                                          strict=False).unexpected_keys
    assert not unexpected and rel_err(_logits(peft_model, ids), _logits(model, ids)) < 1e-6


def test_rejects_misuse(tmp_path):
    with pytest.raises(ValueError, match="no linear layers named"):
        apply_lora_plus(tiny_model("llama", 0), targets=["query_key_value"])
    model = apply_lora_plus(tiny_model("llama", 0))
    with pytest.raises(ValueError, match="already carries"):
        apply_lora_plus(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_lora_model(tiny_model("llama", 0), str(tmp_path))
    with pytest.raises(ValueError, match="lacks"):  # a state dict that is not this adapted model's
        save_lora_model(model, str(tmp_path), state_dict=tiny_model("llama", 0).state_dict())


def test_lora_plus_s2attn_and_pose_train_together(seed, tmp_path):
    from transformers import AutoModelForCausalLM

    ids, labels = batch(seed, 2, 64)
    model = apply_s2attn(apply_lora_plus(tiny_model("llama", seed)))  # groups of 16
    model.train()
    losses = pose_training_losses(model, ids, labels, 512, seed)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    model.eval()  # full attention: equals the merged plain checkpoint under sdpa
    save_lora_model(model, str(tmp_path))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert rel_err(_logits(model, ids), _logits(plain, ids)) < 1e-5
