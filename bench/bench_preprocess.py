"""Preprocessing throughput: megalm-preprocess against a Megatron-style reference, in one run, same input, same
tokenizer files, same worker count; checks the outputs are byte-identical and prints docs/s of both and the ratio
(target >= 5x). With --memory it also runs megalm-preprocess on a 10x larger corpus and compares peak RSS of the
main process (target <= 1.2x), and runs both tools in child processes on --small-docs one-sentence documents to
compare their main processes' peak RSS (the reference holds torch, as Megatron-LM's tool does; megalm-preprocess
imports none).

The reference is how Megatron's tools/preprocess_data.py works: multiprocessing.Pool.imap over lines in chunks of
32, one tokenizer call per document, megatron-core's IndexedDatasetBuilder.

python bench/bench_preprocess.py [--copies 16] [--workers 2] [--memory [--small-docs 200000]]
"""
import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from megalm.data.tokenizers import GPT2BPETokenizer  # noqa: E402
from megalm.tools.build_corpus import build_corpus  # noqa: E402
from megalm.tools.train_tokenizer import train_bpe  # noqa: E402


class ReferenceEncoder:
    def __init__(self, vocab, merges):
        self.vocab, self.merges = vocab, merges

    def initializer(self):
        ReferenceEncoder.tokenizer = GPT2BPETokenizer(self.vocab, self.merges)

    def encode(self, line):
        tok = ReferenceEncoder.tokenizer
        ids = tok.tokenize(json.loads(line)["text"])
        lens = [len(ids)] if ids else []
        if ids:
            ids.append(tok.eod)
            lens[-1] += 1
        return ids, lens


def reference_imports():
    """torch and megatron-core's builder, imported before the reference's clock starts (ours is timed as a
    whole process, its imports included, since that is what a user waits for)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return torch, DType, IndexedDatasetBuilder


def reference(corpus, prefix, vocab, merges, workers, imports):
    torch, DType, IndexedDatasetBuilder = imports
    enc = ReferenceEncoder(vocab, merges)
    enc.initializer()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(ReferenceEncoder.tokenizer.vocab_size))
    with open(corpus) as fin, mp.get_context("fork").Pool(workers, initializer=enc.initializer) as pool:
        for ids, lens in pool.imap(enc.encode, fin, 32):
            builder.add_document(torch.tensor(ids, dtype=torch.int64), lens)
    builder.finalize(prefix + ".idx")


# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across exec, and this parent
# holds torch
PEAK = "print('PEAK_RSS_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def _child(code, *args):
    """Run ``code`` in a fresh interpreter; returns (seconds, peak RSS of that process in MB)."""
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode:
        raise SystemExit(res.stderr)
    return seconds, int(res.stdout.split("PEAK_RSS_KB")[1].split()[0]) / 1024


def ours(corpus, prefix, vocab, merges, workers):
    """megalm-preprocess in a child process; returns (seconds, peak RSS of its main process in MB)."""
    code = f"import sys; from megalm.tools.preprocess_data import main; rc = main(sys.argv[1:]); {PEAK}; sys.exit(rc)"
    return _child(code, "--input", corpus, "--output-prefix", prefix, "--append-eod", "--workers", str(workers),
                  "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges)


def reference_child(corpus, prefix, vocab, merges, workers):
    """The reference in a child process, its imports (torch, megatron-core) included, as a user runs it."""
    code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'bench')!r}); import bench_preprocess as b; "
            f"b.reference(*sys.argv[1:5], int(sys.argv[5]), b.reference_imports()); {PEAK}")
    return _child(code, corpus, prefix, vocab, merges, str(workers))


def small_docs(src, dst, count):
    """``count`` one-sentence documents cut from the corpus (cycled)."""
    sentences = []
    with open(src) as fh:
        for line in fh:
            sentences += [s.strip() + "." for s in json.loads(line)["text"].split(".") if len(s.strip()) > 20]
    with open(dst, "w") as out:
        for i in range(count):
            out.write(json.dumps({"text": sentences[i % len(sentences)]}) + "\n")


def repeat_file(src, dst, copies):
    with open(src, "rb") as fin:
        data = fin.read()
    with open(dst, "wb") as fout:
        for _ in range(copies):
            fout.write(data)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=16, help="the built-in corpus repeated this many times")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory", action="store_true", help="also compare peak RSS on a 10x larger corpus, and against "
                   "the reference on --small-docs documents")
    p.add_argument("--small-docs", type=int, default=200_000)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="megalm-bench-pre-")
    base = os.path.join(work, "base.jsonl")
    build_corpus(base)
    train_bpe([base], ["text"], 8192, os.path.join(work, "tok"))
    vocab, merges = os.path.join(work, "tok", "vocab.json"), os.path.join(work, "tok", "merges.txt")
    corpus = os.path.join(work, "corpus.jsonl")
    repeat_file(base, corpus, args.copies)
    with open(corpus) as fh:
        docs = sum(1 for _ in fh)
    mb = os.path.getsize(corpus) / 1e6
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; corpus {mb:.1f} MB, {docs} documents; "
          f"{args.workers} workers; byte-level BPE, 8192 entries")
    imports = reference_imports()
    start = time.perf_counter()
    reference(corpus, os.path.join(work, "ref"), vocab, merges, args.workers, imports)
    ref_s = time.perf_counter() - start
    our_s, rss = ours(corpus, os.path.join(work, "ours"), vocab, merges, args.workers)
    for ext in (".bin", ".idx"):
        with open(os.path.join(work, "ref" + ext), "rb") as a, open(os.path.join(work, "ours_text_document" + ext), "rb") as b:
            assert a.read() == b.read(), f"outputs differ ({ext})"
    print("outputs byte-identical")
    print(f"reference (Megatron-style): {ref_s:6.1f} s, {docs / ref_s:8.0f} docs/s")
    print(f"megalm-preprocess:          {our_s:6.1f} s, {docs / our_s:8.0f} docs/s (process start included)")
    print(f"speed-up: {ref_s / our_s:.2f}x (target >= 5x)")
    if args.memory:
        big = os.path.join(work, "big.jsonl")
        repeat_file(corpus, big, 10)
        big_s, big_rss = ours(big, os.path.join(work, "big"), vocab, merges, args.workers)
        print(f"peak RSS of the main process: {rss:.0f} MB at {mb:.0f} MB, {big_rss:.0f} MB at {10 * mb:.0f} MB "
              f"({big_rss / rss:.2f}x, target <= 1.2x); 10x corpus took {big_s:.1f} s")
        small = os.path.join(work, "small.jsonl")
        small_docs(base, small, args.small_docs)
        ref_s, ref_rss = reference_child(small, os.path.join(work, "small_ref"), vocab, merges, args.workers)
        our_s, our_rss = ours(small, os.path.join(work, "small_ours"), vocab, merges, args.workers)
        for ext in (".bin", ".idx"):
            with open(os.path.join(work, "small_ref" + ext), "rb") as a, \
                    open(os.path.join(work, "small_ours_text_document" + ext), "rb") as b:
                assert a.read() == b.read(), f"small-document outputs differ ({ext})"
        print(f"{args.small_docs} one-sentence documents ({os.path.getsize(small) / 1e6:.1f} MB), outputs "
              f"byte-identical: peak RSS of the main process: reference {ref_rss:.0f} MB ({ref_s:.1f} s), "
              f"megalm-preprocess {our_rss:.0f} MB ({our_s:.1f} s): {our_rss / ref_rss:.2f}x")


if __name__ == "__main__":
    main()
