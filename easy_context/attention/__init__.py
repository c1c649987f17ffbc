"""Exact attention pieces: local kernels, the (out, lse) merge, collectives, input layouts, packed documents, the
ring, zigzag, Ulysses, USP, dist-flash and S²-Attn algorithms, and the backend registry. Imports only torch.
"""
