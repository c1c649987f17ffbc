"""CEPE (Context Expansion with Parallel Encoding; Yen, Gao, Chen 2024): a frozen decoder reads a long context
through a small bidirectional encoder, run on independent chunks, and cross-attention blocks in its layers.
"""
