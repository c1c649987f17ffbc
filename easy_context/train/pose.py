"""PoSE (Zhu et al., ICLR 2024): train a window of L tokens on position ids spread over a target window T > L.

The L positions are cut into ``num_chunks`` chunks of random lengths (at least 1 token each). Chunk i keeps
contiguous positions shifted by a skip u_i, with u_0 = 0 and u_i drawn uniformly from [u_{i-1}, T - L], so
positions rise strictly, start at 0, and the last one is at most T - 1. Resampled per example, the relative
distances cover 1..T-1 over training. The tokens stay the document's consecutive tokens (the paper's
content offsets v_i "matter little"); rope scaling for T is configured separately.

Feeding the ids: they jump, which transformers' sdpa/eager masks read as packed documents (no attention
across the jump) when no attention_mask is given. Either run an easy_context attention (no mask is built;
shard with ``plan.shard_inputs(..., allow_position_skips=True)``), or pass an all-ones
``attention_mask`` with sdpa.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def pose_position_ids(seq_len: int, target_len: int, num_chunks: int = 2, *,
                      generator: torch.Generator | None = None, device=None) -> Tensor:
    """LongTensor [seq_len] of PoSE positions in [0, target_len): strictly increasing, first one 0."""
    if not 1 <= num_chunks <= seq_len:
        raise ValueError(f"PoSE needs 1 <= num_chunks <= seq_len; got num_chunks={num_chunks}, seq_len={seq_len}")
    if target_len < seq_len:
        raise ValueError(f"PoSE target window ({target_len}) must be at least the training length ({seq_len})")
    room = target_len - seq_len  # the total skip available
    cuts = (torch.randperm(seq_len - 1, generator=generator)[: num_chunks - 1] + 1).sort().values
    lengths = torch.diff(cuts, prepend=torch.tensor([0]), append=torch.tensor([seq_len]))
    skips = [0]
    for _ in range(num_chunks - 1):
        skips.append(int(torch.randint(skips[-1], room + 1, (1,), generator=generator)))
    offsets = torch.tensor(skips).repeat_interleave(lengths)
    return (torch.arange(seq_len) + offsets).to(device)


def pose_batch_position_ids(batch: int, seq_len: int, target_len: int, *, seed: int, device=None) -> Tensor:
    """LongTensor [batch, seq_len]: ``pose_position_ids`` for each row, all drawn from ``seed`` (every rank of
    a sequence-parallel group must pass the same seed: they shard one batch)."""
    generator = torch.Generator().manual_seed(seed)
    rows = [pose_position_ids(seq_len, target_len, generator=generator) for _ in range(batch)]
    return torch.stack(rows).to(device)
