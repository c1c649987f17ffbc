"""Tokenized examples into fixed-length training rows: several packed into one row, each with position ids that
restart at 0 where it starts (Hugging Face's DataCollatorWithFlattening convention: attention that honours it
keeps the examples apart), or one example per row; rows are right-padded, labels -100 on the padding.

Packing is best-fit decreasing (longest example first, each into the fullest row it still fits), so short
examples fill the gaps long ones leave. It is a function of the lengths alone: the same data gives the same
rows on every rank and after a resume.
"""

from __future__ import annotations

import bisect

import torch

IGNORE = -100


def pack_lengths(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` (each in [1, capacity]) grouped so each group's lengths sum to at most
    ``capacity``: best-fit decreasing; groups in the order they were opened, indices in the order placed."""
    groups: list[list[int]] = []
    free: dict[int, list[int]] = {}  # room left -> groups with that much room (the last one is filled first)
    rooms: list[int] = []  # the keys of ``free``, sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if not 0 < n <= capacity:
            raise ValueError(f"example {i} holds {n} tokens: it needs 1 to {capacity} to fit a row")
        at = bisect.bisect_left(rooms, n)
        if at == len(rooms):  # fits no open group: open one
            g, room = len(groups), capacity
            groups.append([])
        else:
            room = rooms[at]
            g = free[room].pop()
            if not free[room]:
                del free[room], rooms[at]
        groups[g].append(i)
        room -= n
        if room:
            if room not in free:
                free[room] = []
                bisect.insort(rooms, room)
            free[room].append(g)
    return groups


class ExampleRows(torch.utils.data.Dataset):
    """Rows {"input_ids", "labels"} [seq_len] (+ "position_ids" when ``packed``) of ``examples`` (a datasets.Dataset
    with input_ids and labels per example) grouped by ``groups`` (lists of example indices, each group at most
    ``seq_len`` tokens), in order, then padded with ``pad_id``. ``summary``: one line for the log; ``dropped``:
    how many examples were left out (too long)."""

    def __init__(self, examples, groups: list[list[int]], seq_len: int, pad_id: int, *, packed: bool,
                 summary: str = "", dropped: int = 0):
        self.examples = examples.with_format("torch", columns=["input_ids", "labels"])
        self.groups, self.seq_len, self.pad_id, self.packed = groups, seq_len, pad_id, packed
        self.summary, self.dropped = summary, dropped

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        parts = [self.examples[j] for j in self.groups[i]]
        ids = torch.cat([p["input_ids"].long() for p in parts])
        labels = torch.cat([p["labels"].long() for p in parts])
        pad = self.seq_len - len(ids)
        if pad < 0:
            raise ValueError(f"row {i} holds {len(ids)} tokens, more than the row length {self.seq_len}")
        row = {"input_ids": torch.cat([ids, ids.new_full((pad,), self.pad_id)]),
               "labels": torch.cat([labels, labels.new_full((pad,), IGNORE)])}
        if self.packed:  # the padding restarts its positions too: a segment of its own, without loss
            row["position_ids"] = torch.cat([torch.arange(len(p["input_ids"])) for p in parts]
                                            + [torch.arange(pad)])
        return row
