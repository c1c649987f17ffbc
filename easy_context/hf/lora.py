"""LongLoRA's "LoRA+" (not the LoRA+ learning-rate method): LoRA on the attention projections, plus fully
trainable input/output embeddings and every normalization layer, via peft; and saving it.

``apply_lora_plus`` injects peft LoRA layers into the model in place (``peft.inject_adapter_in_model``), so
it stays a plain transformers model and ``causal_lm_loss``, ``self_check`` and the attention backends
work on it unchanged. LongLoRA's ablation (Llama-2-7B at 32K, PG19 ppl): LoRA 11.44, + embed + norm 8.12,
full fine-tuning 8.08.

``save_lora_model`` merges W + scaling * B @ A from a state dict on CPU and writes an ordinary checkpoint
for ``AutoModelForCausalLM.from_pretrained``. Under DeepSpeed ZeRO-3 the parameters are partitioned, so
pass the full state dict gathered by ``accelerator.get_state_dict(model)`` (on the main process); only
module attributes (LoRA scaling, names) are read from the model then, never its weights.
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch

Tensor = torch.Tensor
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # Llama, Mistral, Qwen2/3 attention projections
ADAPTER_FILE = "adapter_model.safetensors"
TRAINABLE_FILE = "trainable_params.safetensors"
_PEFT_PREFIX = "base_model.model."  # how PeftModel names the base model's parameters


def extra_trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The non-LoRA parameters LoRA+ trains: input and output embeddings and every norm layer's, by name."""
    wanted = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    wanted |= {id(m) for m in model.modules() if "norm" in type(m).__name__.lower()}
    params: dict[str, torch.nn.Parameter] = {}
    for mod_name, mod in model.named_modules():
        if id(mod) in wanted:
            for p_name, p in mod.named_parameters(recurse=False):
                if all(p is not q for q in params.values()):  # tied embeddings: once, under the input's name
                    params[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    return params


def apply_lora_plus(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, targets: list[str] | None = None):
    """Freeze ``model`` except LoRA (rank r, alpha) on ``targets`` (default q/k/v/o_proj), embeddings and norms."""
    from peft import LoraConfig, inject_adapter_in_model

    if hasattr(model, "peft_config"):
        raise ValueError("apply_lora_plus: the model already carries peft adapters")
    targets = list(targets or DEFAULT_TARGETS)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in linear]
    if missing:
        raise ValueError(f"apply_lora_plus: {type(model).__name__} has no linear layers named {missing}; its linear "
                         f"layers are {sorted(linear)}: pass targets=[...] from those")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        task_type="CAUSAL_LM")
    inject_adapter_in_model(config, model)  # freezes everything but the LoRA A/B matrices
    for p in extra_trainable_parameters(model).values():
        p.requires_grad_(True)
    return model


def _base_and_prefix(model) -> tuple[torch.nn.Module, str]:
    """The transformers model under a PeftModel wrapper (or the model itself) and its name prefix."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model(), _PEFT_PREFIX
    return model, ""


def _lora_layers(model, adapter_name: str) -> dict[str, object]:
    from peft.tuners.lora import Linear, LoraLayer

    layers = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if adapter_name not in m.scaling:
            raise ValueError(f"save_lora_model: {name} has no adapter {adapter_name!r} (has {list(m.scaling)})")
        if not isinstance(m, Linear) or m.use_dora.get(adapter_name) or getattr(m, "lora_bias", {}).get(adapter_name):
            raise ValueError(f"save_lora_model merges plain LoRA on linear layers only; {name} is "
                             f"{type(m).__name__} (DoRA / lora_bias / other layer types are not merged here)")
        layers[name] = m
    if not layers:
        raise ValueError("save_lora_model: the model has no LoRA layers; call apply_lora_plus first")
    return layers


def _align(sd: dict[str, Tensor], layers: dict[str, object], adapter_name: str) -> dict[str, Tensor]:
    """``sd`` with the prefix of a wrapper it was taken from (e.g. "module.", or "model." of
    causal_lm.CausalLMWithLoss) removed, so that its keys match the LoRA layers' names; ValueError if they cannot."""
    first = f"{next(iter(layers))}.lora_A.{adapter_name}.weight"
    if first not in sd:
        prefix = next((k[: -len(first)] for k in sd if k.endswith("." + first)), None)
        if prefix is not None:
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    missing = [f"{n}.{p}" for n in layers for p in ("base_layer.weight", f"lora_A.{adapter_name}.weight",
                                                     f"lora_B.{adapter_name}.weight") if f"{n}.{p}" not in sd]
    if missing:
        raise ValueError(f"save_lora_model: the state dict lacks {len(missing)} LoRA entries of the model, e.g. "
                         f"{missing[:2]} (it has e.g. {list(sd)[:2]}); pass the state dict of this model "
                         "(accelerator.get_state_dict(model)) and the model it came from")
    return sd


def merged_state_dict(model, state_dict: dict[str, Tensor] | None = None,
                      adapter_name: str = "default") -> dict[str, Tensor]:
    """The plain model's state dict (CPU), with W + scaling * B @ A in place of each LoRA layer's weight."""
    layers = _lora_layers(model, adapter_name)
    sd = _align(model.state_dict() if state_dict is None else state_dict, layers, adapter_name)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        owner, sep, rest = key.partition(".base_layer.")
        if sep and owner in layers:
            if rest == "weight":
                lora = layers[owner]
                a = sd[f"{owner}.lora_A.{adapter_name}.weight"].detach().cpu().float()
                b = sd[f"{owner}.lora_B.{adapter_name}.weight"].detach().cpu().float()
                delta = (b @ a) * lora.scaling[adapter_name]
                value = (value.detach().cpu().float() + (delta.T if lora.fan_in_fan_out else delta)).to(value.dtype)
            out[f"{owner}.{rest}"] = value.detach().cpu()
        elif ".lora_" in key:
            if f".{adapter_name}." not in key and not key.endswith(f".{adapter_name}"):
                raise ValueError(f"save_lora_model: {key} belongs to another adapter; only {adapter_name!r} is merged")
        else:
            out[key] = value.detach().cpu()
    return out


def _strip(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in sd.items()}


@contextmanager
def _without_zero3_init():
    # Under an accelerate DeepSpeed ZeRO-3 config transformers builds every new model with zero.Init, a
    # collective; this runs on one process only, so it must build the shell plainly.
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def save_lora_model(model, output_dir: str, *, merge: bool = True, state_dict: dict[str, Tensor] | None = None,
                    adapter_name: str = "default") -> None:
    """Write ``model`` (adapted by ``apply_lora_plus``; pass the ZeRO-3-gathered ``state_dict`` if partitioned).

    merge=True: an ordinary transformers checkpoint (LoRA merged) for ``AutoModelForCausalLM.from_pretrained``.
    merge=False: a peft adapter (adapter_config.json, adapter_model.safetensors) plus trainable_params.safetensors
    (embeddings and norms), for ``load_lora_model`` on top of the base checkpoint. Call on one process only.
    """
    import transformers
    from safetensors.torch import save_file

    base, prefix = _base_and_prefix(model)
    sd = model.state_dict() if state_dict is None else state_dict
    os.makedirs(output_dir, exist_ok=True)
    if merge:
        plain = _strip(merged_state_dict(model, sd, adapter_name), prefix)
        config = copy.deepcopy(base.config)
        config.dtype = next(v.dtype for k, v in plain.items() if k.endswith(".weight") and v.is_floating_point())
        with torch.device("meta"), _without_zero3_init():  # only its structure and conventions are used
            shell = transformers.AutoModelForCausalLM.from_config(config)
        shell.save_pretrained(output_dir, state_dict=plain)
        return
    sd = _align(sd, _lora_layers(model, adapter_name), adapter_name)
    tag = f".{adapter_name}."
    adapter = {_PEFT_PREFIX + k[len(prefix):].replace(tag, "."): v.detach().cpu().contiguous()
               for k, v in sd.items() if ".lora_" in k and tag in k}
    trainable = {name: sd[prefix + name].detach().cpu().clone() for name in extra_trainable_parameters(base)}
    model.peft_config[adapter_name].save_pretrained(output_dir)
    save_file(adapter, os.path.join(output_dir, ADAPTER_FILE), metadata={"format": "pt"})
    save_file(trainable, os.path.join(output_dir, TRAINABLE_FILE), metadata={"format": "pt"})


def load_lora_model(model, adapter_dir: str, adapter_name: str = "default"):
    """Put an adapter saved with ``save_lora_model(merge=False)`` onto the base ``model``; returns it."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file

    inject_adapter_in_model(LoraConfig.from_pretrained(adapter_dir), model, adapter_name)
    adapter = load_file(os.path.join(adapter_dir, ADAPTER_FILE))
    weights = {k[len(_PEFT_PREFIX):].replace(".lora_A.", f".lora_A.{adapter_name}.")
               .replace(".lora_B.", f".lora_B.{adapter_name}."): v for k, v in adapter.items()}
    weights.update(load_file(os.path.join(adapter_dir, TRAINABLE_FILE)))
    result = model.load_state_dict(weights, strict=False)
    lora_missing = [k for k in result.missing_keys if ".lora_" in k]
    if result.unexpected_keys or lora_missing:
        raise ValueError(f"load_lora_model: {adapter_dir} does not fit this model (unexpected "
                         f"{result.unexpected_keys[:4]}, missing {lora_missing[:4]})")
    return model
