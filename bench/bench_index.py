"""Sample-index and blending-index construction at 10^9 tokens: megalm._C against megatron-core's compiled
helpers (``megatron.core.datasets.helpers``), same inputs, in one run; checks the outputs are equal and prints
both times and the ratio.

python bench/bench_index.py [--tokens 1e9] [--seq-length 2048]
"""
import argparse
import os
import platform
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.kernels import extension  # noqa: E402


def best_of(fn, repeats=5):
    """Best time of ``repeats`` runs, the output, and the peak of numpy allocations during one run."""
    best, out = float("inf"), None
    for _ in range(repeats):
        out = None
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    out = None
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return best, out, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=1e9)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--blend-size", type=int, default=10_000_000)
    args = ap.parse_args()
    from megatron.core.datasets import helpers as mh

    ext = extension()
    if ext is None:
        raise SystemExit("megalm._C is not built")
    rng = np.random.default_rng(0)
    docs = int(args.tokens / 600)
    sizes = rng.integers(1, 1200, size=docs).astype(np.int32)
    tokens = int(sizes.sum())
    doc_idx = rng.permutation(docs).astype(np.int32)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {tokens / 1e9:.2f}B tokens in {docs:,} documents,"
          f" sequence {args.seq_length}; best of 5")
    t_ours, ours, m_ours = best_of(lambda: ext.build_sample_idx(sizes, doc_idx, args.seq_length, 1, tokens, 1))
    t_ref, ref, m_ref = best_of(lambda: mh.build_sample_idx(sizes, doc_idx, args.seq_length, 1, tokens, True, True))
    assert np.array_equal(np.asarray(ours, dtype=np.int64), np.asarray(ref, dtype=np.int64)), "sample index differs"
    print(f"sample index   ({len(ours) - 1:,} samples): megalm {t_ours:.4f} s / {m_ours / 1e6:.1f} MB, "
          f"megatron-core {t_ref:.4f} s / {m_ref / 1e6:.1f} MB, time ratio {t_ref / t_ours:.2f}x")
    weights = np.array([0.5, 0.3, 0.2])
    t_ours, (di, dsi), m_ours = best_of(lambda: ext.build_blending_indices(weights, args.blend_size))

    def reference_blend():  # megatron-core fills arrays its caller allocates: allocation counted on both sides
        out = np.empty(args.blend_size, dtype=np.int16), np.empty(args.blend_size, dtype=np.int64)
        mh.build_blending_indices(out[0], out[1], weights, 3, args.blend_size, False)
        return out

    t_ref, (ref_di, ref_dsi), m_ref = best_of(reference_blend)
    assert np.array_equal(di, ref_di) and np.array_equal(dsi, ref_dsi), "blending index differs"
    print(f"blending index ({args.blend_size:,} samples, 3 datasets): megalm {t_ours:.3f} s / {m_ours / 1e6:.0f} MB,"
          f" megatron-core {t_ref:.3f} s / {m_ref / 1e6:.0f} MB, time ratio {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
