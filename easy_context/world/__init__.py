"""The embedded default world: a tiny Llama, a tokenizer trained here and generated long-context retrieval text;
needs no downloads.
"""
