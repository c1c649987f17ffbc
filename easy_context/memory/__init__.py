"""Memory and speed options for training: offloaded or skipped activation checkpoints, MLP in sequence tiles,
attention outputs kept through the recompute, fused pointwise kernels.
"""
