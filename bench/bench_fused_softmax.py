"""CPU fused softmax forward+backward against torch's fastest equivalent, in one run; prints times and the ratio.

The reference for each variant is the faster of two torch paths a user would write, with their masks built once
outside the timed region (as a model caches them): ``torch.softmax(x * scale + additive mask)`` in the input's
dtype, and torch's fused ``torch._masked_softmax(x * scale, boolean mask)``. megalm's own reference
(``softmax_reference``, fp32 throughout) is not the comparison: it is the definition the tests check against.

python bench/bench_fused_softmax.py [--shape 4 16 512 512] [--repeats 5]
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.kernels.fused_softmax import fused_softmax, unsupported_reason  # noqa: E402


def time_fwd_bwd(fn, x, grad, repeats):
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        fn(xi).backward(grad)
        best = min(best, time.perf_counter() - start)
    return best


def torch_paths(name, x, mask):
    """The torch ways to compute softmax(0.125 x + mask) for this variant, masks prepared beforehand."""
    sq, sk = x.shape[-2:]
    if name == "unmasked":
        return {"softmax": lambda t: torch.softmax(t * 0.125, dim=-1)}
    boolean = torch.ones(sq, sk, dtype=torch.bool).triu(1) if name == "causal" else mask
    boolean = boolean.expand(x.shape).contiguous()
    additive = torch.zeros(boolean.shape, dtype=x.dtype).masked_fill(boolean, float("-inf") if name == "causal"
                                                                      else -10000.0)
    return {"softmax+mask": lambda t: torch.softmax(t * 0.125 + additive, dim=-1),
            "_masked_softmax": lambda t: torch._masked_softmax(t * 0.125, boolean, -1)}


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
            times = {path: time_fwd_bwd(fn, x, grad, args.repeats) for path, fn in torch_paths(name, x, mask).items()}
            path, ref = min(times.items(), key=lambda kv: kv[1])
            print(f"{str(dtype):15s} {name:9s} shape {tuple(args.shape)}: fused {1000 * ours:7.1f} ms, "
                  f"torch {1000 * ref:7.1f} ms ({path}; "
                  + ", ".join(f"{p} {1000 * t:.1f}" for p, t in times.items()) + f"), speed-up {ref / ours:.2f}x")


if __name__ == "__main__":
    main()
