"""Model-FLOPs utilisation of megalm on one GPU: a 1.3B GPT (24 layers, hidden 2048, 16 heads, sequence 2048,
vocab 50304) in bf16 with fused AdamW, SDPA (flash) attention and optionally torch.compile, trained through the
Trainer on random tokens; prints tokens/s, TFLOP/s and MFU against the GPU's dense bf16 peak.

    python bench/bench_mfu.py [--iters 30] [--micro-batch-size 4] [--compile] [--attention-backend sdpa|fused]
    python bench/bench_mfu.py --precision autocast   # bf16 autocast over fp32 parameters, the reference for bf16
    python bench/bench_mfu.py --smoke      # a tiny model on CPU: what the test suite runs

The reference for the ratio is the target itself: MFU 50% (Megatron-LM reports 41-49% on H100 clusters). Run with
``--precision bf16`` (megalm's --bf16: bf16 parameters, fp32 main parameters) and ``--precision autocast`` (the
same Trainer with fp32 parameters, each step under torch.autocast) to compare the two; both print peak memory.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.config import load_config  # noqa: E402
from megalm.data.indexed import IndexedDatasetWriter  # noqa: E402
from megalm.parallel.state import Topology  # noqa: E402
from megalm.training.trainer import Trainer  # noqa: E402

TARGET_MFU = 0.50


def random_dataset(workdir, vocab, tokens):
    prefix = os.path.join(workdir, "random_text_document")
    writer = IndexedDatasetWriter(prefix, np.int32)
    rng = np.random.default_rng(0)
    done = 0
    while done < tokens:
        n = int(rng.integers(512, 4096))
        writer.add_document(rng.integers(0, vocab - 1, size=n))
        done += n
    writer.finalize()
    return prefix


def measure(flags: list, iters: int, autocast: bool = False):
    """(the Trainer, its median step time in seconds over the last two thirds of ``iters`` steps) for ``flags``
    (``autocast``: each step under bf16 autocast)."""
    cfg = load_config(flags)
    trainer = Trainer(cfg, Topology())
    device = trainer.device.type
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            trainer.last_loss = trainer.train_step(trainer._micro_batches(trainer.train_ds,
                                                                          trainer.consumed_samples))["loss"]
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        trainer.iteration += 1
        trainer.consumed_samples += cfg.train.global_batch_size
    return trainer, statistics.median(times[len(times) // 3:])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--attention-backend", default="sdpa")
    ap.add_argument("--recompute", default=None, choices=("full", "selective"))
    ap.add_argument("--fp8-recipe", default=None, choices=("tensorwise", "rowwise", "mxfp8"),
                    help="FP8 matmuls in the blocks (hybrid format) with this scaling")
    ap.add_argument("--precision", default=None, choices=("bf16", "autocast", "fp32"),
                    help="bf16 parameters (the default on GPU), bf16 autocast over fp32 parameters, or fp32 (the "
                         "default with --smoke)")
    args = ap.parse_args(argv)
    precision = args.precision or ("fp32" if args.smoke else "bf16")
    if args.smoke:
        shape = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "128"]
        vocab, iters, mbs, gbs = 1024, 4, 2, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --smoke on CPU")
        shape = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048"]
        vocab, iters, mbs, gbs = 50304, args.iters, args.micro_batch_size, args.global_batch_size
    seq = int(shape[shape.index("--seq-length") + 1])
    with tempfile.TemporaryDirectory() as workdir:
        prefix = random_dataset(workdir, vocab, (iters + 2) * gbs * (seq + 1) + 10 * seq)
        flags = [*shape, "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--train-iters",
                 str(iters), "--eval-iters", "0", "--split", "100,0,0", "--data-path", prefix, "--tokenizer-type",
                 "NullTokenizer", "--vocab-size", str(vocab - 1), "--make-vocab-size-divisible-by", "128",
                 "--lr", "1e-4", "--attention-backend", args.attention_backend, "--log-interval", "1000",
                 *(["--bf16"] if precision == "bf16" else []), *(["--torch-compile"] if args.compile else []),
                 *(["--recompute-granularity", args.recompute] if args.recompute else []),
                 *(["--fp8-format", "hybrid", "--fp8-recipe", args.fp8_recipe] if args.fp8_recipe else [])]
        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        trainer, steady = measure(flags, iters, precision == "autocast")
        row = trainer.throughput(gbs * seq, steady)
        params = trainer.model.num_parameters()
        print(f"device: {name}; model {params / 1e9:.3f}B parameters, seq {seq}, micro batch {mbs}, global {gbs}, "
              f"{precision}, attention {args.attention_backend}"
              f"{', compiled' if args.compile else ''}{f', FP8 {args.fp8_recipe}' if args.fp8_recipe else ''}")
        print(f"median step {1000 * steady:.1f} ms | {row['tokens_per_sec']:,.0f} tokens/s | "
              f"{row['tflops_per_device']:.1f} TFLOP/s | loss after {iters} steps {trainer.last_loss:.4f}")
        if "mfu" in row:
            print(f"MFU {100 * row['mfu']:.1f}% (target {100 * TARGET_MFU:.0f}%; ratio "
                  f"{row['mfu'] / TARGET_MFU:.2f})")
        else:
            print("MFU: no peak known for this device (set --peak-tflops in a real run)")
        if device == "cuda":
            print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
