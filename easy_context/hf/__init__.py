"""Hugging Face glue: backends as transformers attention implementations, the startup self-check, the causal-LM
loss wrapper, RoPE and model loading, LoRA+, S²-Attn in a model.
"""
