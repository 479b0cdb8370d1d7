"""Per-rank memory and step time of ZeRO 0, 1 and 2 at DP 2 and 4 on CPU, through the real entry point, in fp32
and with bf16 parameters (fp32 gradients, fp32 main parameters beside the Adam state).

Each configuration trains the same GPT (hidden 256, 4 layers, vocab 8192: ~5.3M parameters) for a few steps
under torchrun; rank 0 reports its parameter, gradient, main-parameter and Adam-state bytes after the first step
(and their sum per parameter), its peak RSS and the median step time. ZeRO 0 at the same DP size and precision
is the reference each row's ratios are taken against.

python bench/bench_zero.py [--iters 8] [--precisions fp32 bf16]
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


def run(prefix: str, workdir: str, dp: int, zero: int, iters: int, precision: str = "fp32") -> dict:
    metrics = os.path.join(workdir, f"dp{dp}-zero{zero}-{precision}.jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dp), "--master_port",
           str(free_port()), "megalm/pretrain.py", "--num-layers", "4", "--hidden-size", "256",
           "--num-attention-heads", "8", "--seq-length", "128", "--micro-batch-size", "2",
           "--global-batch-size", str(4 * dp), "--train-iters", str(iters), "--eval-iters", "0",
           "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
           "--split", "100,0,0", "--zero-stage", str(zero), "--metrics-file", metrics, "--log-interval", "100"]
    if precision != "fp32":
        cmd.append(f"--{precision}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rows = [json.loads(line) for line in open(metrics)]
    first = rows[0]
    state = sum(first.get(k, 0) for k in ("param_bytes", "grad_bytes", "main_param_bytes", "optimizer_state_bytes"))
    params = first["param_bytes"] / (4 if precision == "fp32" else 2)
    return {"param_mb": first["param_bytes"] / 1e6, "grad_mb": first["grad_bytes"] / 1e6,
            "main_mb": first.get("main_param_bytes", 0) / 1e6, "adam_mb": first["optimizer_state_bytes"] / 1e6,
            "bytes_per_param": state / params, "rss_mb": max(r.get("max_rss_mb", 0) for r in rows),
            "ms": statistics.median(r["ms_per_iter"] for r in rows[2:])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; gloo, one thread "
          f"per rank")
    with tempfile.TemporaryDirectory() as workdir:
        prefix = dataset(workdir)
        print(f"{'layout':<20}{'params MB':>10}{'grads MB':>10}{'main MB':>9}{'Adam MB':>9}{'Adam ratio':>11}"
              f"{'B/param':>8}{'peak RSS MB':>12}{'ms/step':>9}{'time ratio':>11}")
        for precision in args.precisions:
            for dp in (2, 4):
                base = None
                for zero in (0, 1, 2):
                    r = run(prefix, workdir, dp, zero, args.iters, precision)
                    base = base or r
                    print(f"{f'{precision} DP {dp} ZeRO {zero}':<20}{r['param_mb']:>10.1f}{r['grad_mb']:>10.1f}"
                          f"{r['main_mb']:>9.1f}{r['adam_mb']:>9.1f}{r['adam_mb'] / base['adam_mb']:>11.2f}"
                          f"{r['bytes_per_param']:>8.2f}{r['rss_mb']:>12.0f}{r['ms']:>9.0f}{r['ms'] / base['ms']:>11.2f}")


if __name__ == "__main__":
    main()
