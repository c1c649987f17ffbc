"""Each local attention kernel on one GPU vs float64 attention: forward out/lse and backward dq/dk/dv.

    python -m benchmarks.check_kernels

Prints one row per kernel, causal flag, head layout and memory layout (BHSD contiguous, or the
BSHD-strided views that Hugging Face models pass), with relative errors ||x - ref|| / ||ref||.
"""

from __future__ import annotations

import itertools

import torch

from easy_context.attention.kernels import available_kernels, get_kernel
from tests.helpers.reference import full_attention, rel_err


def main():
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    probe = torch.empty(1, 1, 1, 128, device=dev, dtype=dt)
    names = [n for n in available_kernels(probe, probe) if n != "reference"]
    print("kernels:", names, "cudnn", torch.backends.cudnn.version())
    worst = 0.0
    for name, causal, (h, hkv, d), strided in itertools.product(
            names, (True, False), [(8, 8, 128), (8, 2, 64)], (False, True)):
        b, s = 2, 1000
        q, k, v, do = (torch.randn(b, hh, s, d, dtype=torch.float64) for hh in (h, hkv, hkv, h))
        ref = full_attention(q, k, v, do, causal)

        def dev_t(x):
            x = x.to(dev, dt)
            return x.transpose(1, 2).contiguous().transpose(1, 2) if strided else x.contiguous()
        kern = get_kernel(name)
        gq, gk, gv, gdo = map(dev_t, (q, k, v, do))
        out, lse = kern.forward(gq, gk, gv, causal, d ** -0.5)
        dq, dk, dv = kern.backward(gdo, gq, gk, gv, out, lse, causal, d ** -0.5)
        errs = [rel_err(x.cpu(), r) for x, r in zip((out, lse, dq, dk, dv), ref)]
        worst = max(worst, *errs)
        print(f"{name:10s} causal={causal!s:5s} H={h} Hkv={hkv} D={d} {'BSHD' if strided else 'BHSD'} "
              + " ".join(f"{n}={e:.1e}" for n, e in zip(("out", "lse", "dq", "dk", "dv"), errs)), flush=True)
    print(f"worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()
