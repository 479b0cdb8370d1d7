"""Megatron's memory-mapped indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), byte-compatible both ways.

``.idx`` layout (little-endian, unpadded): magic, version, dtype code, S, D, int32 lengths[S],
int64 pointers[S], int64 document index[D], optionally int8 modes[S]. ``.bin`` holds the tokens.
"""
from __future__ import annotations

import functools
import hashlib
import os
import struct
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document index length
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class IndexedFormatError(ValueError):
    """A ``.bin/.idx`` pair breaks a rule of the format; the message names the file."""


def optimal_dtype(vocab_size: Optional[int]):
    """uint16 below 65,500 entries (Megatron's rule), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


class _SpillArray:
    """Append-only array kept in a temporary file, so a writer's memory does not grow with the corpus."""

    chunk_items = 1 << 16  # entries read back at a time: finalize holds a few of these, whatever the corpus size

    def __init__(self, path: str, dtype):
        self.path, self.dtype, self.size = path, np.dtype(dtype), 0
        self._fh = open(path, "wb")

    def extend(self, values) -> None:
        arr = np.asarray(values, dtype=self.dtype).reshape(-1)
        self._fh.write(arr.tobytes())
        self.size += arr.size

    def chunks(self) -> Iterable[np.ndarray]:
        self._fh.flush()
        with open(self.path, "rb") as fh:
            while data := fh.read(self.chunk_items * self.dtype.itemsize):
                yield np.frombuffer(data, dtype=self.dtype)

    def remove(self) -> None:
        self._fh.close()
        if os.path.exists(self.path):
            os.remove(self.path)


class IndexedDatasetWriter:
    """Streams documents to ``PREFIX.bin`` and writes ``PREFIX.idx`` on ``finalize``.

    Files are written under temporary names and renamed at the end, so an interrupted run never leaves a pair
    that looks complete. Sequence lengths and the document index go to temporary files as they arrive and are
    streamed into the ``.idx`` at the end: memory stays flat however large the corpus.
    """

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"{prefix}: dtype {self.dtype} has no code in the .idx format")
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin_tmp = bin_path(prefix) + ".tmp"
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = _SpillArray(idx_path(prefix) + ".lengths.tmp", np.int32)
        self._doc_index = _SpillArray(idx_path(prefix) + ".documents.tmp", np.int64)
        self._doc_index.extend((0,))

    def add_document(self, tokens, lengths: Optional[Sequence[int]] = None) -> None:
        """Append one document; ``lengths`` splits it into several sequences (sentences)."""
        arr = np.asarray(tokens, dtype=self.dtype)
        if lengths is None:
            lengths = (arr.size,) if arr.size else ()
        elif sum(lengths) != arr.size:
            raise ValueError(f"{self.prefix}: sentence lengths sum to {sum(lengths)} but the document has "
                             f"{arr.size} tokens")
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.extend(lengths)
        self._doc_index.extend((self._lengths.size,))

    def add_documents(self, flat_tokens: np.ndarray, seq_lengths: np.ndarray, docs_seq_counts: np.ndarray) -> None:
        """Append many documents at once: tokens of all sequences, their lengths, sequences per document."""
        self._bin.write(np.asarray(flat_tokens, dtype=self.dtype).tobytes(order="C"))
        start = self._lengths.size
        self._lengths.extend(seq_lengths)
        self._doc_index.extend(start + np.cumsum(docs_seq_counts, dtype=np.int64))

    def add_index(self, other_prefix: str) -> None:
        """Append every document of another dataset (used to merge partitions and datasets)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise IndexedFormatError(f"{other_prefix}: dtype {other.dtype} differs from {self.dtype} of {self.prefix}")
        start = self._lengths.size
        self._lengths.extend(other.lengths)
        self._doc_index.extend(start + other.doc_index[1:])
        with open(bin_path(other_prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._bin.write(chunk)

    def finalize(self) -> None:
        self._bin.close()
        _write_index_chunks(idx_path(self.prefix), self.dtype, self._lengths.size, self._doc_index.size,
                            self._lengths.chunks, self._doc_index.chunks)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        self._lengths.remove()
        self._doc_index.remove()

    def abort(self) -> None:
        self._bin.close()
        if os.path.exists(self._bin_tmp):
            os.remove(self._bin_tmp)
        self._lengths.remove()
        self._doc_index.remove()


def write_index(path: str, dtype, lengths: np.ndarray, doc_index: np.ndarray) -> None:
    lengths, doc_index = np.asarray(lengths, dtype=np.int32), np.asarray(doc_index, dtype=np.int64)
    _write_index_chunks(path, dtype, lengths.size, doc_index.size, lambda: [lengths], lambda: [doc_index])


def _write_index_chunks(path: str, dtype, n_seq: int, n_doc: int, length_chunks: Callable[[], Iterable[np.ndarray]],
                        doc_chunks: Callable[[], Iterable[np.ndarray]]) -> None:
    """Writes an ``.idx`` from chunks of lengths and of the document index (each a callable giving a fresh
    iterator): pointers are running byte offsets, so the lengths are read twice and never held whole."""
    dtype = np.dtype(dtype)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(HEADER.pack(MAGIC, VERSION, CODES[dtype], n_seq, n_doc))
        for chunk in length_chunks():
            fh.write(np.asarray(chunk, dtype=np.int32).tobytes())
        offset = 0
        for chunk in length_chunks():
            sizes = np.asarray(chunk, dtype=np.int64) * dtype.itemsize
            pointers = np.cumsum(sizes) - sizes + offset
            fh.write(pointers.tobytes())
            offset += int(sizes.sum())
        for chunk in doc_chunks():
            fh.write(np.asarray(chunk, dtype=np.int64).tobytes())
    os.replace(tmp, path)


class IndexedDataset:
    """Memory-mapped reader, validated on open; ``get`` reads any sequence or sub-span in O(1)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file (dataset prefix {prefix})")
        idx_size = os.path.getsize(ipath)
        if idx_size < HEADER.size:
            raise IndexedFormatError(f"{ipath}: {idx_size} bytes, shorter than the {HEADER.size}-byte header")
        with open(ipath, "rb") as fh:
            magic, version, code, n_seq, n_doc = HEADER.unpack(fh.read(HEADER.size))
        if magic != MAGIC:
            raise IndexedFormatError(f"{ipath}: bad magic {magic!r}, not a Megatron MMIDIDX index")
        if version != VERSION:
            raise IndexedFormatError(f"{ipath}: version {version}, only version 1 is defined")
        if code not in DTYPES:
            raise IndexedFormatError(f"{ipath}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        need = HEADER.size + 12 * n_seq + 8 * n_doc
        if idx_size not in (need, need + n_seq):
            raise IndexedFormatError(f"{ipath}: {idx_size} bytes, but {n_seq} sequences and {n_doc} document entries "
                              f"need {need} (or {need + n_seq} with sequence modes)")
        if n_doc < 1:
            raise IndexedFormatError(f"{ipath}: empty document index (it must start with 0)")
        self._idx = np.memmap(ipath, dtype=np.uint8, mode="r")
        off = HEADER.size
        self.lengths = np.frombuffer(self._idx, dtype=np.int32, count=n_seq, offset=off)
        self.pointers = np.frombuffer(self._idx, dtype=np.int64, count=n_seq, offset=off + 4 * n_seq)
        self.doc_index = np.frombuffer(self._idx, dtype=np.int64, count=n_doc, offset=off + 12 * n_seq)
        self.modes = (np.frombuffer(self._idx, dtype=np.int8, count=n_seq, offset=need)
                      if idx_size > need else None)
        self._check(ipath, bpath, n_seq)
        self._opened = {path: _identity(path) for path in (ipath, bpath)}
        if os.path.getsize(bpath):
            self._bin = np.memmap(bpath, dtype=self.dtype, mode="r")
        else:
            self._bin = np.zeros(0, dtype=self.dtype)

    def _check(self, ipath: str, bpath: str, n_seq: int) -> None:
        if self.doc_index[0] != 0 or self.doc_index[-1] != n_seq:
            raise IndexedFormatError(f"{ipath}: document index runs {self.doc_index[0]}..{self.doc_index[-1]}, "
                              f"expected 0..{n_seq} (the sequence count)")
        if np.any(np.diff(self.doc_index) < 0):
            raise IndexedFormatError(f"{ipath}: document index is not non-decreasing")
        if np.any(self.lengths < 0):
            raise IndexedFormatError(f"{ipath}: negative sequence length")
        item = self.dtype.itemsize
        if n_seq:
            if self.pointers[0] != 0 or np.any(np.diff(self.pointers) != self.lengths[:-1].astype(np.int64) * item):
                raise IndexedFormatError(f"{ipath}: sequence pointers disagree with lengths x itemsize {item}")
        expected = int(self.pointers[-1]) + int(self.lengths[-1]) * item if n_seq else 0
        actual = os.path.getsize(bpath)
        if actual != expected:
            raise IndexedFormatError(f"{bpath}: {actual} bytes, but {ipath} describes {expected} "
                              f"({'truncated' if actual < expected else 'extra data'})")

    def check_unchanged(self) -> None:
        """Stop, naming the file, when the .bin or .idx was deleted, replaced, truncated or rewritten since it was
        opened: reads past a truncation would kill the process (SIGBUS), and a file rewritten in place would give
        other samples than the indices were built for."""
        for path, opened in self._opened.items():
            now = _identity(path)
            if now != opened:
                what = "deleted" if now is None else "replaced or rewritten (size, inode or modification time changed)"
                raise IndexedFormatError(f"{path}: {what} while the run was reading it; restore the file (or "
                                         "preprocess again and restart: its sample indices are rebuilt)")

    @functools.cached_property
    def fingerprint(self) -> str:
        """What index caches are keyed by, so that a dataset written again (even with the same document count)
        never reuses stale indices: both files' sizes and modification times, and a SHA-256 of the .idx header
        with its first and last MiB (lengths and document index). Read once per open dataset: the token-id check
        and every split's indices ask for it."""
        h = hashlib.sha256()
        for path in (idx_path(self.prefix), bin_path(self.prefix)):
            st = os.stat(path)
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
        head = 1 << 20
        h.update(self._idx[:head].tobytes())
        h.update(self._idx[max(head, self._idx.size - head):].tobytes())
        return h.hexdigest()[:32]

    def max_token_id(self, chunk: int = 1 << 24) -> int:
        """The largest token id in the .bin (-1 when empty), read in chunks of ``chunk`` tokens."""
        return max((int(self._bin[i: i + chunk].max()) for i in range(0, self._bin.size, chunk)), default=-1)

    def __len__(self) -> int:
        return self.lengths.size

    @property
    def num_documents(self) -> int:
        return self.doc_index.size - 1

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.lengths

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence ``index`` from ``offset``, ``length`` of them (default: to its end)."""
        seq_len = int(self.lengths[index])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"{self.prefix}: span [{offset}, {offset + length}) outside sequence {index} "
                             f"of length {seq_len}")
        start = int(self.pointers[index]) // self.dtype.itemsize + offset
        return self._bin[start: start + length]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def document(self, doc: int) -> Iterable[np.ndarray]:
        return [self.get(i) for i in range(int(self.doc_index[doc]), int(self.doc_index[doc + 1]))]


def _identity(path: str):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def exists(prefix: str) -> bool:
    return os.path.exists(idx_path(prefix)) and os.path.exists(bin_path(prefix))


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> None:
    """Concatenate several datasets of one dtype into one, documents in the given order."""
    if not prefixes:
        raise ValueError("merge_datasets: no input prefixes")
    writer = IndexedDatasetWriter(output_prefix, IndexedDataset(prefixes[0]).dtype)
    try:
        for prefix in prefixes:
            writer.add_index(prefix)
    except BaseException:
        writer.abort()
        raise
    writer.finalize()
