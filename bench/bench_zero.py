"""Per-rank memory and step time of ZeRO 0, 1 and 2 at DP 2 and 4 on CPU, through the real entry point.

Each configuration trains the same GPT (hidden 256, 4 layers, vocab 8192: ~5.3M parameters) for a few steps
under torchrun; rank 0 reports its parameter, gradient and Adam-state bytes after the first step, its peak RSS and
the median step time. ZeRO 0 at the same DP size is the reference each row's ratio is taken against.

python bench/bench_zero.py [--iters 8]
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megalm.data.indexed import IndexedDatasetWriter  # noqa: E402

VOCAB = 8192


def dataset(workdir: str, vocab: int = VOCAB, documents: int = 400) -> str:
    """A dataset of random tokens (documents of 200 to 2,000) for benchmarks through the real entry point."""
    prefix = os.path.join(workdir, "random_text_document")
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(prefix, np.int32)
    for _ in range(documents):
        writer.add_document(rng.integers(0, vocab - 1, size=int(rng.integers(200, 2000))))
    writer.finalize()
    return prefix


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(prefix: str, workdir: str, dp: int, zero: int, iters: int) -> dict:
    metrics = os.path.join(workdir, f"dp{dp}-zero{zero}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dp), "--master_port",
           str(free_port()), "megalm/pretrain.py", "--num-layers", "4", "--hidden-size", "256",
           "--num-attention-heads", "8", "--seq-length", "128", "--micro-batch-size", "2",
           "--global-batch-size", str(4 * dp), "--train-iters", str(iters), "--eval-iters", "0",
           "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
           "--split", "100,0,0", "--zero-stage", str(zero), "--metrics-file", metrics, "--log-interval", "100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rows = [json.loads(line) for line in open(metrics)]
    first = rows[0]
    return {"param_mb": first["param_bytes"] / 1e6, "grad_mb": first["grad_bytes"] / 1e6,
            "adam_mb": first["optimizer_state_bytes"] / 1e6, "rss_mb": max(r.get("max_rss_mb", 0) for r in rows),
            "ms": statistics.median(r["ms_per_iter"] for r in rows[2:])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; gloo, one thread "
          f"per rank")
    with tempfile.TemporaryDirectory() as workdir:
        prefix = dataset(workdir)
        print(f"{'layout':<14}{'params MB':>10}{'grads MB':>10}{'Adam MB':>10}{'Adam ratio':>11}{'peak RSS MB':>12}"
              f"{'ms/step':>9}{'time ratio':>11}")
        for dp in (2, 4):
            base = None
            for zero in (0, 1, 2):
                r = run(prefix, workdir, dp, zero, args.iters)
                base = base or r
                print(f"{f'DP {dp} ZeRO {zero}':<14}{r['param_mb']:>10.1f}{r['grad_mb']:>10.1f}{r['adam_mb']:>10.1f}"
                      f"{r['adam_mb'] / base['adam_mb']:>11.2f}{r['rss_mb']:>12.0f}{r['ms']:>9.0f}"
                      f"{r['ms'] / base['ms']:>11.2f}")


if __name__ == "__main__":
    main()
