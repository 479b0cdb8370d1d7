"""Checkpoint saves of a 125M GPT (bf16 parameters, ZeRO 1) at DP 1, 2 and 4 through the real entry point (gloo,
CPU): how long a save blocks the training loop, synchronous and with --async-save, how long the writing itself
takes, and the bytes each rank writes (every rank writes its own ZeRO slice of the Adam state).

Each run trains 4 iterations saving at 2 and 4 with --timing-log-level 1: the save after iteration 2 blocks the
loop for ``time_checkpoint_ms`` of iteration 3's row; the writing time is what rank 0 logs when the checkpoint is
published. Target: async blocks the loop for under 20% of a synchronous save's time.

python bench/bench_checkpoint.py [--sizes 1 2 4] [--layers 12] [--hidden 768]
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

from bench_zero import ROOT, dataset, free_port

VOCAB = 50257


def run(a, prefix: str, workdir: str, dp: int, background: bool) -> dict:
    name = f"dp{dp}-{'async' if background else 'sync'}"
    save, metrics = os.path.join(workdir, name), os.path.join(workdir, name + ".jsonl")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dp), "--master_port",
           str(free_port()), "megalm/pretrain.py", "--num-layers", str(a.layers), "--hidden-size", str(a.hidden),
           "--num-attention-heads", str(a.hidden // 64), "--seq-length", "128", "--max-position-embeddings", "1024",
           "--micro-batch-size", "1", "--global-batch-size", str(dp), "--train-iters", "4", "--eval-iters", "0",
           "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB - 1),
           "--split", "100,0,0", "--zero-stage", "1", "--bf16", "--save", save, "--save-interval", "2",
           "--timing-log-level", "1", "--metrics-file", metrics, "--log-interval", "100"]
    if background:
        cmd.append("--async-save")
    res = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rows = [r for r in map(json.loads, open(metrics)) if "loss" in r]
    written = [float(s) for s in re.findall(r"saved checkpoint \S+iter_0000002 \(rank 0 wrote [\d.]+ MB in "
                                            r"([\d.]+) s", res.stderr + res.stdout)]
    folder = os.path.join(save, "iter_0000002")
    per_rank = {}
    for f in os.listdir(folder):
        m = re.search(r"-dp(\d{5})", f)
        per_rank[int(m.group(1)) if m else 0] = per_rank.get(int(m.group(1)) if m else 0, 0) + \
            os.path.getsize(os.path.join(folder, f))
    return {"blocked_s": rows[2]["time_checkpoint_ms"] / 1000, "written_s": written[0] if written else float("nan"),
            "mb_per_rank": [per_rank[r] / 1e6 for r in sorted(per_rank)], "step_ms": rows[1]["ms_per_iter"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    a = ap.parse_args()
    print(f"# bench_checkpoint: GPT {a.layers} layers x {a.hidden}, vocabulary {VOCAB}, bf16 parameters, ZeRO 1; "
          f"{platform.machine()}, {os.cpu_count()} cores; gloo, one thread per rank")
    print(f"{'DP':>3} {'sync blocks s':>14} {'async blocks s':>15} {'async/sync':>11} {'target':>7} "
          f"{'written s (rank 0)':>19}  MB written per rank")
    with tempfile.TemporaryDirectory() as workdir:
        prefix = dataset(workdir, VOCAB, 200)
        for dp in a.sizes:
            sync, background = run(a, prefix, workdir, dp, False), run(a, prefix, workdir, dp, True)
            print(f"{dp:>3} {sync['blocked_s']:>14.2f} {background['blocked_s']:>15.2f} "
                  f"{background['blocked_s'] / sync['blocked_s']:>11.3f} {'< 0.20':>7} "
                  f"{background['written_s']:>19.2f}  {' '.join(f'{m:.0f}' for m in background['mb_per_rank'])}")


if __name__ == "__main__":
    main()
