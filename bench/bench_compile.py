"""torch.compile of each transformer block (``--torch-compile``) against eager, the same Trainer and batches in
one run: median step time of both and the speedup (compilation itself is left out: the first third of the steps
is not counted). On a GPU the 1.3B GPT of bench_mfu.py in bf16; on a CPU (``--cpu``) a small GPT in fp32.

    python bench/bench_compile.py --cpu [--iters 12]
    python bench/bench_compile.py [--iters 20]        # a GPU
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mfu import measure, random_dataset  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="a small GPT on the CPU")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args(argv)
    if args.cpu:
        shape = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "256",
                 "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
                 "--disable-bias-linear", "--untie-embeddings-and-output-weights"]
        vocab, mbs, gbs, precision, iters = 4096, 4, 4, [], args.iters or 12
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no GPU: run with --cpu")
        shape = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048"]
        vocab, mbs, gbs, precision, iters = 50304, 4, 8, ["--bf16"], args.iters or 20
    seq = int(shape[shape.index("--seq-length") + 1])
    with tempfile.TemporaryDirectory() as workdir:
        prefix = random_dataset(workdir, vocab, (iters + 2) * gbs * (seq + 1) + 10 * seq)
        flags = [*shape, "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--train-iters",
                 str(iters), "--eval-iters", "0", "--split", "100,0,0", "--data-path", prefix, "--tokenizer-type",
                 "NullTokenizer", "--vocab-size", str(vocab - 1), "--lr", "1e-4", "--log-interval", "1000",
                 *precision]
        _, eager = measure(flags, iters)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        _, compiled = measure(flags + ["--torch-compile"], iters)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {device}; torch {torch.__version__}; {' '.join(shape[:8])}, micro batch {mbs}, "
          f"{'bf16' if precision else 'fp32'}, median of steps {iters // 3 + 1}..{iters}")
    print(f"eager    {1000 * eager:8.1f} ms/step, {gbs * seq / eager:8.0f} tokens/s")
    print(f"compiled {1000 * compiled:8.1f} ms/step, {gbs * seq / compiled:8.0f} tokens/s ({breaks} graph breaks)")
    print(f"speedup compiled / eager: {eager / compiled:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
