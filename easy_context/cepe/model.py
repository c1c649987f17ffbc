"""A CEPE model: a Hugging Face decoder (Llama, Mistral, Qwen2, Qwen3) whose layers are wrapped so that the last
``cross_layers`` of them attend to the context encoder's memory between self-attention and the MLP, plus the
encoder. The decoder's own weights are frozen: only the encoder and the cross-attention blocks train.

``CEPEDecoderLayer`` takes over the wrapped layer's four parts under their own names (``self_attn``, ``mlp`` and
the two norms), so the decoder's state-dict keys do not change and its layers still checkpoint one by one (the
wrapper is the layer transformers' and easy_context's gradient checkpointing switch). The memory reaches it as
the keyword argument ``cepe_memory``, which transformers passes to every decoder layer. Without a memory a
wrapped decoder computes exactly what the decoder computed.
"""

from __future__ import annotations

import functools

import torch

from .config import CEPEConfig, check_family, cross_layer_indices, resolve_config
from .cross_attention import CrossAttention, Memory, cross_attention_like, init_cross_attention
from .encoder import ContextEncoder, encoder_config

Tensor = torch.Tensor
# Decoder layers whose forward is: x + self_attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x)).
KNOWN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer")
LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
MEMORY_KWARG = "cepe_memory"


def is_trainable(name: str) -> bool:
    """Whether a CEPEModel parameter (by its name) trains: the encoder's and the cross-attention blocks'."""
    return name.startswith("encoder.") or ".cross_attn." in name


class CEPEDecoderLayer(torch.nn.Module):
    """A decoder layer with a cross-attention block (or None: the layer as it was) between its self-attention and
    its MLP: x += self_attn(norm1(x)); x += cross_attn(x, memory) (its own norm inside); x += mlp(norm2(x))."""

    gradient_checkpointing = False  # transformers' gradient_checkpointing_enable sets it (and the function)

    def __init__(self, layer: torch.nn.Module, cross_attn: CrossAttention | None = None):
        super().__init__()
        for name in LAYER_PARTS:
            setattr(self, name, getattr(layer, name))
        self.cross_attn = cross_attn
        self.wraps = type(layer).__name__

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(functools.partial(self._layer, **kwargs), hidden_states, *args)
        return self._layer(hidden_states, *args, **kwargs)

    def _layer(self, hidden_states: Tensor, *args, cepe_memory: Memory | None = None, **kwargs) -> Tensor:
        if args:
            raise ValueError(f"{self.wraps} wrapped by CEPE takes its inputs after hidden_states by keyword")
        residual = hidden_states
        attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = residual + attended
        if cepe_memory is not None and self.cross_attn is not None:
            hidden_states = hidden_states + self.cross_attn(hidden_states, cepe_memory)
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


def decoder_layers(decoder) -> torch.nn.ModuleList:
    """The decoder layers of a HF causal LM (``model.layers``); ValueError if it has none there."""
    layers = getattr(decoder.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(decoder).__name__} keeps no decoder layers in .model.layers: CEPE cannot wrap it")
    return layers


def check_wrappable(decoder) -> None:
    """ValueError unless every layer of ``decoder`` is one CEPE knows how to wrap (``KNOWN_LAYERS``, made of
    exactly ``LAYER_PARTS``)."""
    check_family(decoder.config)
    for i, layer in enumerate(decoder_layers(decoder)):
        parts = sorted(name for name, _ in layer.named_children())
        if type(layer).__name__ not in KNOWN_LAYERS or parts != sorted(LAYER_PARTS):
            raise ValueError(f"layer {i} of {type(decoder).__name__} is a {type(layer).__name__} with parts {parts}: "
                             f"CEPE wraps only {', '.join(KNOWN_LAYERS)} (parts {', '.join(LAYER_PARTS)}), whose "
                             "forward it knows")


class CEPEModel(torch.nn.Module):
    """``decoder`` (HF causal LM, layers wrapped by ``wrap_decoder``) + ``encoder`` (ContextEncoder), with the
    resolved ``cepe_config``. ``encode`` turns chunk ids into a Memory; calling the model runs the decoder body
    over its window with that memory and returns the last hidden state [B, S, H] (the head is the decoder's)."""

    def __init__(self, decoder, encoder: ContextEncoder, cepe_config: CEPEConfig):
        super().__init__()
        self.decoder, self.encoder, self.cepe_config = decoder, encoder, cepe_config
        self.config = decoder.config  # accelerate sizes DeepSpeed's "auto" buckets from config.hidden_size

    def encode(self, chunk_ids: Tensor, chunk_mask: Tensor | None = None, *, group=None, queries: str = "replicated",
               kernel: str | None = None) -> Memory:
        """The memory of chunk_ids [B, n, c] (this rank's chunks when the memory is spread over ``group``; n may
        be 0 there, for a rank with no chunk to encode)."""
        if chunk_ids.shape[1] == 0:
            weight = self.encoder.model.embed_tokens.weight
            states = weight.new_zeros(chunk_ids.shape[0], 0, self.encoder.hidden_size)
            return Memory(states, None, group=group, queries=queries, kernel=kernel)
        states, mask = self.encoder(chunk_ids, chunk_mask)
        return Memory(states, mask, group=group, queries=queries, kernel=kernel)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, memory: Memory | None = None,
                **kwargs) -> Tensor:
        out = self.decoder.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                      **{MEMORY_KWARG: memory}, **kwargs)
        return out.last_hidden_state

    def head(self) -> torch.nn.Linear:
        """The decoder's output head (its weight: [vocab, H])."""
        return self.decoder.get_output_embeddings()


def wrap_decoder(decoder, cfg: CEPEConfig, memory_size: int, init: str | None = None) -> None:
    """Wrap every layer of ``decoder`` in place (``check_wrappable``), the last ``cfg.cross_layers`` with a
    cross-attention block reading ``memory_size``-wide states, initialized by ``init`` (default ``cfg.init``)."""
    check_wrappable(decoder)
    layers = decoder_layers(decoder)
    crossed = set(cross_layer_indices(cfg, len(layers)))
    std = getattr(decoder.config, "initializer_range", 0.02)
    for i, layer in enumerate(layers):
        cross = None
        if i in crossed:
            cross = cross_attention_like(layer.self_attn, layer.post_attention_layernorm, memory_size)
            cross.to(layer.self_attn.q_proj.weight.device)
            init_cross_attention(cross, layer.self_attn, layer.post_attention_layernorm, init or cfg.init, std)
        layers[i] = CEPEDecoderLayer(layer, cross)


def freeze_decoder(model: CEPEModel) -> None:
    """Only the encoder and the cross-attention blocks train (``is_trainable``); the decoder's weights are fixed."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name))


def build_cepe(decoder, cfg: CEPEConfig, *, init: str | None = None) -> CEPEModel:
    """A CEPE model around the HF causal LM ``decoder`` (changed in place): ``cfg`` resolved against its config,
    a new encoder in the decoder's dtype and device (random: seed before), layers wrapped, decoder frozen."""
    cfg = resolve_config(cfg, decoder.config)
    check_wrappable(decoder)  # before anything is built
    weight = decoder.get_output_embeddings().weight
    encoder = ContextEncoder(encoder_config(cfg, vocab_size=decoder.config.vocab_size,
                                            pad_token_id=decoder.config.pad_token_id)).to(weight.device, weight.dtype)
    wrap_decoder(decoder, cfg, encoder.hidden_size, init)
    model = CEPEModel(decoder, encoder, cfg)
    freeze_decoder(model)
    return model
