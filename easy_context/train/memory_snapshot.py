"""Where the GPU memory of a step goes: the CUDA allocator's history, recorded from the first step, is dumped as a
snapshot (a pickle for https://pytorch.org/memory_viz) after the second optimizer step (the first builds the
optimizer's state; the second is a steady step), after a run's only step, or at an out-of-memory error, and
summarised as the memory live at its peak, grouped by the line of code that allocated it."""

from __future__ import annotations

import os
import pickle
import sys

import torch

from .new_file import create_new

BEFORE = "(allocated before recording began)"
# frames of these files are plumbing: the allocation site is the first frame outside them
_PLUMBING = (os.path.dirname(torch.__file__) + os.sep, os.sep + "contextlib.py", os.sep + "functools.py")


def allocation_site(frames: list[dict]) -> str:
    """"file:line (function)" of the innermost frame outside torch and the stdlib's plumbing (``frames``: innermost
    first, as the allocator records them); the innermost frame when all are plumbing, ``BEFORE`` when none."""
    if not frames:
        return BEFORE
    frame = next((f for f in frames if not any(p in f["filename"] for p in _PLUMBING)), frames[0])
    path = frame["filename"]
    for root in sorted((p for p in sys.path if p), key=len, reverse=True):  # the shortest readable path
        if path.startswith(root.rstrip(os.sep) + os.sep):
            path = path[len(root.rstrip(os.sep)) + 1:]
            break
    return f"{path}:{frame['line']} ({frame['name']})"


def _trace(snapshot: dict, device: int) -> list[dict]:
    """``device``'s recorded allocator events in a snapshot ([] when none were recorded)."""
    return snapshot["device_traces"][device] if snapshot.get("device_traces") else []


def live_at_peak(snapshot: dict, device: int = 0) -> tuple[int, list[tuple[int, list[dict]]]]:
    """(peak bytes, [(bytes, frames)] of the blocks live then), replaying ``device``'s trace from a
    ``torch.cuda.memory._snapshot()``: blocks the trace frees before allocating them, and blocks still allocated
    at the end that it never allocates, were live from its start (frames [] when their allocation is unknown)."""
    trace = _trace(snapshot, device)
    free_action = "free_completed" if any(e["action"] == "free_completed" for e in trace) else "free_requested"
    allocated, live = set(), {}
    for e in trace:  # what lived before the trace's first event
        if e["action"] == "alloc":
            allocated.add(e["addr"])
        elif e["action"] == free_action and e["addr"] not in allocated:
            live[e["addr"]] = (e["size"], [])
    for seg in snapshot["segments"]:
        if seg.get("device", device) != device:
            continue
        for b in seg["blocks"]:
            if b["state"] == "active_allocated" and b["address"] not in allocated:
                live[b["address"]] = (b["size"], b.get("frames", []))
    peak, peak_at, _ = _replay(trace, live, free_action, len(trace))
    at_peak = _replay(trace, live, free_action, peak_at + 1)[2]  # copying the live set at each new peak: quadratic
    return peak, list(at_peak.values())


def _replay(trace: list[dict], live: dict, free_action: str, stop: int) -> tuple[int, int, dict]:
    """(peak bytes, the index of the event that reached it (-1: the start), the blocks live after event ``stop`` - 1)
    of ``trace``'s first ``stop`` events, from the blocks ``live`` at its start (address -> (bytes, frames))."""
    blocks, total = dict(live), sum(size for size, _ in live.values())
    peak, peak_at = total, -1
    for i, e in enumerate(trace[:stop]):
        if e["action"] == "alloc":
            blocks[e["addr"]] = (e["size"], e.get("frames", []))
            total += e["size"]
        elif e["action"] == free_action and e["addr"] in blocks:
            total -= blocks.pop(e["addr"])[0]
        if total > peak:
            peak, peak_at = total, i
    return peak, peak_at, blocks


def summarize(snapshot: dict, device: int = 0, top: int = 15) -> str:
    """A table of the memory live at the trace's peak: GiB and block count per allocation site, largest first
    (the ``top`` largest, then the rest in one line), then each allocation that failed for want of memory."""
    peak, blocks = live_at_peak(snapshot, device)
    sites: dict[str, list[int]] = {}
    for size, frames in blocks:
        entry = sites.setdefault(allocation_site(frames), [0, 0])
        entry[0] += size
        entry[1] += 1
    rows = sorted(sites.items(), key=lambda kv: -kv[1][0])
    lines = [f"GPU memory live at the peak of the recorded trace: {peak / 2**30:.2f} GiB", "   GiB  blocks  site"]
    lines += [f"{size / 2**30:6.2f}  {count:6d}  {site}" for site, (size, count) in rows[:top]]
    rest = rows[top:]
    if rest:
        lines.append(f"{sum(s for _, (s, _) in rest) / 2**30:6.2f}  {sum(c for _, (_, c) in rest):6d}  "
                     f"({len(rest)} other sites)")
    trace = _trace(snapshot, device)
    lines += [f"out of memory asking for {e['size'] / 2**30:.2f} GiB at {allocation_site(e.get('frames', []))}"
              for e in trace if e["action"] == "oom"]
    return "\n".join(lines)


def check_snapshot_path(path: str) -> None:
    """SystemExit before any work when a snapshot cannot be taken at ``path``: no CUDA, a file already there (it is
    never overwritten), or a folder that does not exist."""
    if not torch.cuda.is_available():
        raise SystemExit(f"--memory-snapshot {path}: recording GPU memory needs a CUDA GPU; leave the flag out on CPU")
    for existing in (p for p in (path, path + ".txt") if os.path.exists(p)):
        raise SystemExit(f"--memory-snapshot {path}: {existing} exists and is never overwritten; name a new file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"--memory-snapshot {path}: no folder {folder}; create it first")


class MemorySnapshot:
    """Records this process's CUDA allocations from construction, and writes ``path`` (the snapshot) and
    ``path``.txt (``summarize``) once: at ``dump()`` or at the first out-of-memory error, whichever comes first."""

    def __init__(self, path: str, max_entries: int = 1_000_000):
        self.path, self.done = path, False
        torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
        torch._C._cuda_attach_out_of_memory_observer(lambda *_: self.dump("at the out-of-memory error"))

    def dump(self, when: str = "after the first steps") -> None:
        """Write the snapshot and its summary (printed too), then stop recording; later calls do nothing."""
        if self.done:
            return
        self.done = True
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        text = summarize(snapshot, torch.cuda.current_device())
        saved = create_new(self.path, lambda f: pickle.dump(snapshot, f))
        text += f"\n(snapshot {when}: {self.path}{'' if saved else ' NOT written: the file appeared meanwhile'})"
        create_new(self.path + ".txt", lambda f: f.write(text.encode() + b"\n"))
        print(text, file=sys.stderr, flush=True)
