"""``megalm-preprocess``: JSON lines to Megatron ``.bin/.idx`` datasets, tokenized in parallel.

The main process reads batches of lines; worker processes parse and tokenize a whole batch at once with the
tokenizer's batch encoder; results come back in input order and stream to the writers. Nothing is kept per
document beyond one length in a numpy array, and outputs appear under their final names only when complete.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from megalm.config import ConfigError, DataConfig, validate_tokenizer
from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter, exists, merge_datasets, optimal_dtype
from megalm.data.tokenizers import TokenizerError, build_tokenizer
from megalm.data.jsonl import JsonlError, expand_inputs, iter_lines, parse_document

# a sentence ends at . ! or ? (and any closing quotes or brackets), before whitespace and a capital, digit or quote
_SENTENCE_END = re.compile(r"([.!?][\"')\]]*)(\s+)(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str, keep_newlines: bool = False) -> List[str]:
    """Built-in rule-based splitter (no download). With ``keep_newlines`` a sentence keeps the newlines that
    follow it, so paragraph breaks survive; otherwise the whitespace between sentences is dropped."""
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end(1)
        tail = m.group(2)
        sentence = text[start:end] + ("\n" * tail.count("\n") if keep_newlines else "")
        if sentence.strip():
            sentences.append(sentence)
        start = m.end(2)
    if text[start:].strip():
        sentences.append(text[start:])
    return sentences


@dataclass
class Batch:
    path: str
    first_line: int
    lines: List[str]


class Encoder:
    """Parses and tokenizes a batch of lines; the tokenizer is built lazily, once in each worker process (the
    pool's initializer installs the encoder there, so tasks carry only their lines)."""

    def __init__(self, data_cfg: DataConfig, keys: List[str], append_eod: bool, split: bool, keep_newlines: bool,
                 skip_bad_lines: bool):
        self.data_cfg, self.keys, self.append_eod = data_cfg, keys, append_eod
        self.split, self.keep_newlines, self.skip_bad_lines = split, keep_newlines, skip_bad_lines
        self._tok = None

    def __getstate__(self):
        return dict(self.__dict__, _tok=None)

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = build_tokenizer(self.data_cfg)
        return self._tok

    def encode(self, batch: Batch) -> dict:
        docs, bad = [], []
        for i, line in enumerate(batch.lines):
            where = f"{batch.path}:{batch.first_line + i}"
            try:
                doc = parse_document(line, self.keys, where)
            except JsonlError as exc:
                if not self.skip_bad_lines:
                    return {"error": str(exc)}
                bad.append(where)
                continue
            if doc is not None:
                docs.append(doc)
        out = {"docs": len(docs), "bytes": sum(len(line) for line in batch.lines), "bad": bad}
        for key in self.keys:
            out[key] = self._encode_key([d[key] for d in docs])
        return out

    def _encode_key(self, values) -> tuple:
        """Flat tokens, sequence lengths and sequences per document, for one JSON key of the batch."""
        pieces, owner = [], []
        for d, value in enumerate(values):
            if isinstance(value, list):  # already split into sentences, as Megatron takes it
                parts = value
            else:
                parts = split_sentences(value, self.keep_newlines) if self.split else [value]
            pieces.extend(parts)
            owner.extend([d] * len(parts))
        if pieces:
            flat, lengths = self.tokenizer.encode_flat(pieces)
        else:
            flat, lengths = np.zeros(0, np.int32), np.zeros(0, np.int64)
        keep = lengths > 0  # empty sequences are dropped; they hold no tokens, so `flat` is unchanged
        lengths, owner = lengths[keep], np.asarray(owner, dtype=np.int64)[keep]
        if self.append_eod and len(lengths):  # the end-of-document id follows each document's last sequence
            last = np.flatnonzero(np.append(owner[1:] != owner[:-1], True))
            flat = np.insert(flat, np.cumsum(lengths)[last], self.tokenizer.eod)
            lengths[last] += 1
        counts = np.bincount(owner, minlength=len(values))
        return flat, lengths.astype(np.int32), counts.astype(np.int64)


_worker_encoder: Optional[Encoder] = None  # set in each pool worker by _init_worker


def _init_worker(encoder: Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(batch: Batch) -> dict:
    return _worker_encoder.encode(batch)


def batches(files: List[str], size: int, lines: Optional[range] = None):
    """Batches of ``size`` lines, each from one file; ``lines`` keeps only those global line numbers (0-based
    over all files in order), for one partition."""
    seen = -1
    for path in files:
        buf, first = [], 1
        for _, lineno, line in iter_lines([path]):
            seen += 1
            if lines is not None and seen not in lines:
                if seen >= lines.stop:  # past this partition: the rest of the input is not read
                    break
                continue
            if not buf:
                first = lineno
            buf.append(line)
            if len(buf) == size:
                yield Batch(path, first, buf)
                buf = []
        if buf:
            yield Batch(path, first, buf)
        if lines is not None and seen >= lines.stop:
            return


def output_name(args, prefix: str, key: str) -> str:
    """``PREFIX_KEY_document`` (or ``_sentence`` with --split-sentences), as Megatron names its outputs."""
    return f"{prefix}_{key}_{'sentence' if args.split_sentences else 'document'}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalm-preprocess", description="Tokenize JSONL into .bin/.idx datasets.")
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="JSONL files or globs; .gz allowed")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize; one dataset per key")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (built-in splitter)")
    g.add_argument("--keep-newlines", action="store_true", help="keep newlines between sentences when splitting")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip lines that are not JSON objects with the keys (default: stop at the first)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, help="GPT2BPETokenizer, SentencePieceTokenizer, "
                   "GPTSentencePieceTokenizer, Llama2Tokenizer, HuggingFaceTokenizer or NullTokenizer")
    g.add_argument("--tokenizer-model")
    g.add_argument("--sentencepiece-legacy-specials", action="store_true",
                   help="SentencePieceTokenizer as Megatron-LM's older _SentencePieceTokenizer (README)")
    g.add_argument("--vocab-extra-ids", type=int, default=0)
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--append-eod", action="store_true", help="end every document with the end-of-document id")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.bin/.idx")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--batch-lines", type=int, default=1024, help="lines per task sent to a worker")
    g.add_argument("--log-interval", type=int, default=10000, help="documents between progress updates")
    g.add_argument("--partitions", type=int, default=1,
                   help="process the input in this many consecutive parts, each written as it completes and "
                        "merged at the end; a rerun after an interruption skips the finished parts")
    return p


def _count_lines(files: List[str]) -> int:
    return sum(1 for _ in iter_lines(files))


def run(args) -> dict:
    """Preprocess ``args.input``; with ``--partitions N`` part by part (resumable), then merged."""
    if args.partitions < 1:
        raise ConfigError("--partitions must be at least 1")
    if args.partitions == 1:
        return _run(args, args.output_prefix, None)
    files = expand_inputs(args.input)
    total = _count_lines(files)
    bounds = [total * i // args.partitions for i in range(args.partitions + 1)]
    stats = {"docs": 0, "bytes": 0, "bad": 0, "bad_lines": [], "seconds": 0.0, "skipped_partitions": []}
    parts = []
    for i in range(args.partitions):
        prefix = f"{args.output_prefix}_part{i:03d}of{args.partitions:03d}"
        parts.append(prefix)
        done = [output_name(args, prefix, k) for k in args.json_keys]
        if all(exists(d) for d in done):  # written atomically: present means complete
            print(f"partition {i + 1}/{args.partitions}: already done ({done[0]}), skipping", file=sys.stderr)
            stats["skipped_partitions"].append(i)
            continue
        print(f"partition {i + 1}/{args.partitions}: lines {bounds[i] + 1}-{bounds[i + 1]}", file=sys.stderr)
        part = _run(args, prefix, range(bounds[i], bounds[i + 1]), allow_empty=True)
        for key in ("docs", "bytes", "bad", "seconds"):
            stats[key] += part[key]
        stats["bad_lines"] += part["bad_lines"][: max(0, 10 - len(stats["bad_lines"]))]
    stats["outputs"] = []
    for key in args.json_keys:
        final = output_name(args, args.output_prefix, key)
        merge_datasets([output_name(args, p, key) for p in parts], final)
        stats["outputs"].append(final)
        if IndexedDataset(final).num_documents == 0:
            raise JsonlError(f"--input {' '.join(args.input)}: no documents found (empty input)")
    for p in parts:
        for key in args.json_keys:
            for ext in (".bin", ".idx"):
                os.remove(output_name(args, p, key) + ext)
    return stats


def _run(args, output_prefix: str, lines: Optional[range], allow_empty: bool = False) -> dict:
    data_cfg = DataConfig(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                          vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size,
                          sentencepiece_legacy_specials=args.sentencepiece_legacy_specials,
                          vocab_extra_ids=args.vocab_extra_ids)
    validate_tokenizer(data_cfg)
    if args.workers < 1 or args.batch_lines < 1:
        raise ConfigError("--workers and --batch-lines must be at least 1")
    files = expand_inputs(args.input)
    encoder = Encoder(data_cfg, args.json_keys, args.append_eod, args.split_sentences, args.keep_newlines,
                      args.skip_bad_lines)
    tokenizer = encoder.tokenizer
    outputs = {k: output_name(args, output_prefix, k) for k in args.json_keys}
    writers = {k: IndexedDatasetWriter(p, optimal_dtype(tokenizer.vocab_size)) for k, p in outputs.items()}
    stats = {"docs": 0, "bytes": 0, "bad": 0, "bad_lines": [], "outputs": list(outputs.values())}
    compressed = any(f.endswith(".gz") for f in files)
    total = None if compressed else sum(os.path.getsize(f) for f in files)
    pool = mp.get_context("fork").Pool(args.workers, _init_worker, (encoder,)) if args.workers > 1 else None
    start = time.perf_counter()
    try:
        from tqdm import tqdm

        todo = batches(files, args.batch_lines, lines)
        results = pool.imap(_encode_in_worker, todo) if pool else map(encoder.encode, todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", mininterval=1.0,
                  disable=None) as bar:
            last_log = 0
            for res in results:
                if "error" in res:
                    raise JsonlError(res["error"] + " (use --skip-bad-lines to skip such lines)")
                for key, writer in writers.items():
                    writer.add_documents(*res[key])
                stats["docs"] += res["docs"]
                stats["bytes"] += res["bytes"]
                stats["bad"] += len(res["bad"])
                stats["bad_lines"].extend(res["bad"][: max(0, 10 - len(stats["bad_lines"]))])
                bar.update(res["bytes"])
                elapsed = time.perf_counter() - start
                bar.set_postfix(docs=stats["docs"], docs_per_s=f"{stats['docs'] / elapsed:.0f}", refresh=False)
                if bar.disable and stats["docs"] - last_log >= args.log_interval:
                    last_log = stats["docs"]
                    print(f"processed {stats['docs']} documents ({stats['docs'] / elapsed:.0f} docs/s, "
                          f"{stats['bytes'] / elapsed / 1e6:.1f} MB/s)", file=sys.stderr)
        if stats["docs"] == 0 and not allow_empty:
            raise JsonlError(f"--input {' '.join(args.input)}: no documents found (empty input)")
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    stats["seconds"] = time.perf_counter() - start
    return stats


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = run(args)
    except (JsonlError, ConfigError, TokenizerError, FileNotFoundError) as exc:
        print(f"megalm-preprocess: error: {exc}", file=sys.stderr)
        return 2
    secs = stats["seconds"]
    print(f"wrote {stats['docs']} documents in {secs:.1f} s ({stats['docs'] / secs:.0f} docs/s, "
          f"{stats['bytes'] / secs / 1e6:.1f} MB/s): " + ", ".join(p + ".{bin,idx}" for p in stats["outputs"]))
    if stats["bad"]:
        print(f"skipped {stats['bad']} bad lines; first: {', '.join(stats['bad_lines'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
