"""Parallel plumbing over the attention layer: DP x SP process groups, input sharding, the exact chunked loss,
and the plan that fixes backend, groups, layout and kernel once.
"""
