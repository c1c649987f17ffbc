"""Sequence-parallel evaluation: needle in a haystack, perplexity over a length sweep, documents, resumable
results, plots.
"""
