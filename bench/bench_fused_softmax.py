"""CPU fused softmax forward+backward against the torch reference, in one run; prints times and the ratio.

python bench/bench_fused_softmax.py [--shape 4 16 512 512] [--repeats 5]
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.kernels.fused_softmax import fused_softmax, softmax_reference, unsupported_reason  # noqa: E402


def time_fwd_bwd(fn, x, grad, repeats):
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        fn(xi).backward(grad)
        best = min(best, time.perf_counter() - start)
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", type=int, nargs=4, default=[4, 16, 512, 512])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    b, h, sq, sk = args.shape
    torch.manual_seed(0)
    mask = torch.rand(b, 1, sq, sk) < 0.1
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(b, h, sq, sk, dtype=dtype)
        grad = torch.randn_like(x)
        for name, kw in (("causal", {"causal": True}), ("padding", {"mask": mask}), ("unmasked", {})):
            reason = unsupported_reason(x, kw.get("mask"), kw.get("causal", False))
            if reason:
                print(f"{dtype} {name}: kernel unavailable ({reason})")
                continue
            ours = time_fwd_bwd(lambda t: fused_softmax(t, 0.125, **kw), x, grad, args.repeats)
            ref = time_fwd_bwd(lambda t: softmax_reference(t, 0.125, **kw), x, grad, args.repeats)
            print(f"{str(dtype):15s} {name:9s} shape {tuple(args.shape)}: fused {1000 * ours:7.1f} ms, "
                  f"reference {1000 * ref:7.1f} ms, speed-up {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
