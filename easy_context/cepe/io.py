"""Save and load a CEPE model as a directory: ``cepe_config.json`` (the CEPE fields and where the frozen decoder
comes from) and ``cepe_weights.safetensors`` (the encoder's and cross-attention blocks' weights only). The decoder
is not copied unless asked (``save_decoder``): then its own Hugging Face files go into the same directory and
the config points there, so the directory stands alone. ``load_cepe`` rebuilds the model from it.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..hf.models import load_config, load_model
from .config import CEPEConfig, check_family
from .model import CEPEModel, build_cepe, is_trainable

CONFIG_FILE = "cepe_config.json"
WEIGHTS_FILE = "cepe_weights.safetensors"
HERE = "."  # the decoder source of a directory that holds the decoder itself
FORMAT = 1


def is_cepe_dir(path: str) -> bool:
    """Whether ``path`` holds a saved CEPE model."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def _decoder_source(source: str) -> str:
    """A local decoder path made absolute (the saved directory may move; the decoder does not); hub names kept."""
    return os.path.abspath(source) if os.path.exists(source) else source


def save_cepe(model: CEPEModel, path: str, *, decoder_source: str, state_dict: dict | None = None,
              tokenizer=None, save_decoder: bool = False) -> str:
    """Write ``model`` to the directory ``path`` (module doc) via a temporary directory; returns ``path``.
    ``decoder_source``: where the decoder loads from (a local path or hub name); ``state_dict``: the model's full
    state dict when it must be gathered first (DeepSpeed ZeRO-3: ``accelerator.get_state_dict``)."""
    state = model.state_dict() if state_dict is None else state_dict
    trained = {k: v.detach().cpu().contiguous() for k, v in state.items() if is_trainable(k)}
    if not trained:
        raise ValueError("the state dict holds no encoder or cross-attention weights: pass the CEPE model's")
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from safetensors.torch import save_file

    save_file(trained, os.path.join(tmp, WEIGHTS_FILE))
    if save_decoder:
        decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.") and not is_trainable(k)}
        model.decoder.save_pretrained(tmp, state_dict=decoder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    meta = {"format": FORMAT, "decoder": HERE if save_decoder else _decoder_source(decoder_source),
            "decoder_model_type": model.config.model_type, "cepe": model.cepe_config.to_dict()}
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def read_cepe_config(path: str) -> tuple[CEPEConfig, str]:
    """(CEPE fields, decoder path or hub name) of a saved CEPE directory; ValueError if it is not one."""
    if not is_cepe_dir(path):
        raise ValueError(f"{path!r} holds no {CONFIG_FILE}: it is not a saved CEPE model (train_cepe.py writes "
                         "OUTPUT/model)")
    with open(os.path.join(path, CONFIG_FILE)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}/{CONFIG_FILE} has format {meta.get('format')!r}; this easy_context reads {FORMAT}")
    decoder = path if meta["decoder"] == HERE else meta["decoder"]
    return CEPEConfig.from_dict(meta["cepe"]), decoder


def load_cepe(path: str, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              decoder: str | None = None) -> CEPEModel:
    """The CEPE model saved in ``path``: its decoder (from the recorded source, or ``decoder``) with the saved
    encoder and cross-attention weights; the decoder family is checked before any weights load."""
    cfg, source = read_cepe_config(path)
    source = decoder or source
    check_family(load_config(source))
    model = build_cepe(load_model(source, dtype=dtype), cfg, init="zero")  # every trainable weight is replaced
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, WEIGHTS_FILE))
    wanted = {k for k, _ in model.named_parameters() if is_trainable(k)}
    missing, extra = sorted(wanted - set(weights)), sorted(set(weights) - wanted)
    if missing or extra:
        raise ValueError(f"{path}/{WEIGHTS_FILE} does not fit its config: missing {missing[:4]}, unexpected "
                         f"{extra[:4]}")
    model.load_state_dict(weights, strict=False)
    return model.to(device) if device is not None else model
