"""Cost of TP 2 and PP 2 on 2 CPU ranks against one rank, and the bytes each layout communicates per step
against the minimum that layout needs.

Each layout trains the same GPT for a few steps under torchrun (gloo); a wrapper counts the payload bytes rank 0
hands to torch.distributed per step (collectives and point-to-point). The minimum, per step and rank, with m
micro-batches of b x s tokens, hidden h, L layers, fp32:

- TP t (no sequence parallelism): per layer and micro-batch, 2 all-reduces of b s h in forward (after the
  row-parallel attention and MLP outputs) and 2 in backward (the column-parallel inputs' gradients), plus the
  vocabulary-parallel embedding's forward and the output layer's input gradient: (4 L + 2) m b s h x 4 bytes;
- PP 2, counted on the first stage (what it sends): each micro-batch's activation once, m b s h x 4 bytes, plus
  the tied embedding's gradient all-reduced with the last stage once per step: V h x 4 bytes.

Scalars (loss, gradient norm, stop checks) are counted in the measurement, not in the minimum.

python bench/bench_comm.py [--iters 6]
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

VOCAB, LAYERS, HIDDEN, SEQ, MBS, GBS = 8192, 4, 256, 256, 4, 16

COUNTER = r"""
import json, os, sys
import torch.distributed as dist
sys.path.insert(0, {root!r})
counted = {{"bytes": 0}}
def wrap(name):
    real = getattr(dist, name)
    def counting(*args, **kwargs):
        if name == "batch_isend_irecv":
            counted["bytes"] += sum(op.tensor.numel() * op.tensor.element_size() for op in args[0]
                                    if op.op in (dist.isend,))
        else:
            t = args[0] if name not in ("all_gather_into_tensor", "reduce_scatter_tensor") else args[1]
            if name == "all_gather":
                t = args[1]
            counted["bytes"] += t.numel() * t.element_size()
        return real(*args, **kwargs)
    setattr(dist, name, counting)
for n in ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "batch_isend_irecv",
          "broadcast"):
    wrap(n)
from megalm.pretrain import main
rc = main(sys.argv[1:])
if int(os.environ.get("RANK", "0")) == 0:
    json.dump(counted, open(os.environ["COMM_OUT"], "w"))
sys.exit(rc)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workdir, prefix, name, nproc, layout, iters):
    script = os.path.join(workdir, "count.py")
    with open(script, "w") as fh:
        fh.write(COUNTER.format(root=ROOT))
    metrics, out = os.path.join(workdir, f"{name}.jsonl"), os.path.join(workdir, f"{name}.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), script, "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
           "--num-attention-heads", "8", "--seq-length", str(SEQ), "--micro-batch-size", str(MBS),
           "--global-batch-size", str(GBS), "--train-iters", str(iters), "--eval-iters", "0", "--split", "100,0,0",
           "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
           "--metrics-file", metrics, "--log-interval", "1000", *layout]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // nproc)), COMM_OUT=out)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rows = [json.loads(line) for line in open(metrics)]
    return statistics.median(r["tokens_per_sec"] for r in rows[1:]), json.load(open(out))["bytes"] / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=6)
    args = ap.parse_args()
    m, bsh = GBS // MBS, MBS * SEQ * HIDDEN
    minimum = {"one rank": 0, "TP 2": (4 * LAYERS + 2) * m * bsh * 4, "PP 2": m * bsh * 4 + VOCAB * HIDDEN * 4}
    layouts = {"one rank": (1, []), "TP 2": (2, ["--tensor-model-parallel-size", "2"]),
               "PP 2": (2, ["--pipeline-model-parallel-size", "2"])}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; GPT L={LAYERS} h={HIDDEN} s={SEQ} V={VOCAB}, "
          f"{m} micro-batches of {MBS} per step, fp32, gloo; 2 threads in total per layout")
    with tempfile.TemporaryDirectory() as workdir:
        prefix = os.path.join(workdir, "random_text_document")
        writer = IndexedDatasetWriter(prefix, np.int32)
        rng = np.random.default_rng(0)
        for _ in range(300):
            writer.add_document(rng.integers(0, VOCAB - 1, size=int(rng.integers(300, 3000))))
        writer.finalize()
        base = None
        print(f"{'layout':<10}{'tokens/s':>10}{'vs 1 rank':>10}{'MB sent/step':>14}{'minimum MB':>12}{'ratio':>7}")
        for name, (nproc, layout) in layouts.items():
            tps, sent = run(workdir, prefix, name.replace(" ", ""), nproc, layout, args.iters)
            base = base or tps
            low = minimum[name]
            ratio = f"{sent / low:>7.2f}" if low else f"{'-':>7}"
            print(f"{name:<10}{tps:>10.0f}{tps / base:>10.2f}{sent / 1e6:>14.2f}{low / 1e6:>12.2f}{ratio}")


if __name__ == "__main__":
    main()
