"""Issue 8, session 9: does splitting the ring's local causal block cost attention throughput? One GPU, cuDNN, the
128K-over-2-GPUs Llama-2-7B shape (32 heads, head_dim 128, 64K local tokens, q/k/v/dO as [B, S, H, D] memory
viewed [B, H, S, D], as the model hands them over). The ring backward runs the local block as three calls (the
lower-left quadrant early, the two causal diagonal quadrants late, ring.split_local_blocks) so that the first K/V
hop and the last dK/dV hop overlap compute; this times that split against one causal call, forward and backward,
and the step-1 zigzag block (32K queries x 64K keys) for the throughput of a large non-causal call.
  python benchmarks/sessions/gpu14_local_block.py
"""
import sys

import torch

sys.path.insert(0, ".")
from easy_context.kernels import get_kernel  # noqa: E402
from easy_context.ring import ALL, Block, split_local_blocks  # noqa: E402

S, H, D = 65536, 32, 128
kern = get_kernel("cudnn")
scale = D ** -0.5


def bshd(s: int) -> torch.Tensor:
    return torch.randn(1, s, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)


def timed(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def flops(blocks: list[Block], s: int, backward: bool) -> float:
    total = 0.0
    for b in blocks:
        nq = len(range(s)[b.q])
        nk = len(range(s)[b.k])
        total += 4 * nq * nk * D * H * (0.5 if b.causal else 1.0)
    return total * (2.5 if backward else 1.0)


q, k, v, dout = bshd(S), bshd(S), bshd(S), bshd(S)
out, lse = kern.forward(q, k, v, True, scale)
whole = [Block(ALL, ALL, True)]
early, late = split_local_blocks(whole, S)


def run_forward(blocks):
    return lambda: [kern.forward(q[:, :, b.q], k[:, :, b.k], v[:, :, b.k], b.causal, scale) for b in blocks]


def run_backward(blocks):
    return lambda: [kern.backward(dout[:, :, b.q], q[:, :, b.q], k[:, :, b.k], v[:, :, b.k], out[:, :, b.q],
                                  lse[:, :, b.q], b.causal, scale) for b in blocks]


half = S // 2
step1 = [Block(slice(half, S), ALL, False)]
rows = []
for name, blocks in (("local causal, one call", whole), ("local causal, split in 3", early + late),
                     ("zigzag step-1 block (32K x 64K)", step1)):
    for direction, make in (("forward", run_forward), ("backward", run_backward)):
        t = timed(make(blocks))
        rows.append((name, direction, t, flops(blocks, S, direction == "backward") / t / 1e12))
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
print("| block | pass | ms | TFLOP/s |\n|---|---|---|---|")
for name, direction, t, tf in rows:
    print(f"| {name} | {direction} | {t * 1e3:.1f} | {tf:.0f} |")
one, split = rows[1][2], rows[3][2]
print(f"backward: split / one call = {split / one:.3f} ({(split - one) * 1e3:+.1f} ms per layer, "
      f"{(split - one) * 32:+.3f} s per 32-layer step)")
