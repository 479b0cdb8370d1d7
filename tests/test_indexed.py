"""The .bin/.idx format: the worked example byte for byte, validation errors, and megatron-core both ways."""
import os
import struct
import warnings

import numpy as np
import pytest

from conftest import require
from megalm.data.indexed import (IndexedDataset, IndexedDatasetWriter, IndexedFormatError, _SpillArray,
                                 merge_datasets, optimal_dtype)


def write(prefix, docs, dtype=np.uint16):
    w = IndexedDatasetWriter(str(prefix), dtype)
    for d in docs:
        w.add_document(d)
    w.finalize()
    return str(prefix)


def test_worked_example_byte_for_byte(tmp_path):
    prefix = write(tmp_path / "ex", [[1, 2, 3, 4, 5], [6, 7, 8]])
    idx = open(prefix + ".idx", "rb").read()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8]) + struct.pack("<QQ", 2, 3)
                + struct.pack("<2i", 5, 3) + struct.pack("<2q", 0, 10) + struct.pack("<3q", 0, 1, 2))
    assert len(idx) == 82 and idx == expected
    assert open(prefix + ".bin", "rb").read() == np.arange(1, 9, dtype="<u2").tobytes()
    assert len(open(prefix + ".bin", "rb").read()) == 16


def test_reader_random_access_and_empty_document(tmp_path):
    prefix = write(tmp_path / "r", [[1, 2, 3], [], [4, 5, 6, 7]], np.int32)
    ds = IndexedDataset(prefix)
    assert len(ds) == 2 and ds.num_documents == 3
    assert list(ds.doc_index) == [0, 1, 1, 2]  # the empty document repeats a boundary
    assert list(ds.get(1, 1, 2)) == [5, 6] and list(ds[0]) == [1, 2, 3]
    with pytest.raises(IndexError, match="outside sequence 1"):
        ds.get(1, 3, 2)


def test_writer_spills_index_to_disk_and_streams_it(tmp_path, monkeypatch):
    """Lengths and the document index live in temporary files, not memory, and reach the .idx in chunks; chunks
    of 1,000 entries (so pointers cross chunk boundaries) give the same bytes as one whole array."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(0, 9)) for _ in range(5000)]
    whole = write(tmp_path / "whole", docs)
    monkeypatch.setattr(_SpillArray, "chunk_items", 1000)
    w = IndexedDatasetWriter(str(tmp_path / "chunked"), np.uint16)
    for d in docs:
        w.add_document(d)
    assert {f for f in os.listdir(tmp_path) if f.startswith("chunked")} == {
        "chunked.bin.tmp", "chunked.idx.lengths.tmp", "chunked.idx.documents.tmp"}
    w.finalize()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"chunked{ext}", "rb").read() == open(whole + ext, "rb").read()
    ds = IndexedDataset(str(tmp_path / "chunked"))
    assert len(ds) == sum(1 for d in docs if len(d)) and ds.num_documents == len(docs)
    aborted = IndexedDatasetWriter(str(tmp_path / "aborted"), np.uint16)
    aborted.add_document([1, 2])
    aborted.abort()
    assert not [f for f in os.listdir(tmp_path) if f.startswith("aborted")]


def test_optimal_dtype():
    assert optimal_dtype(50257) == np.uint16 and optimal_dtype(65500) == np.int32


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "g", [[1, 2, 3, 4, 5], [6, 7, 8]])


def corrupt(path, offset, data):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def test_truncated_bin(good):
    with open(good + ".bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(IndexedFormatError, match=r"g.bin: 10 bytes, but .*16 \(truncated\)"):
        IndexedDataset(good)


def test_bad_magic(good):
    corrupt(good + ".idx", 0, b"XXXX")
    with pytest.raises(IndexedFormatError, match=r"g.idx: bad magic"):
        IndexedDataset(good)


def test_bad_version(good):
    corrupt(good + ".idx", 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedFormatError, match="version 2"):
        IndexedDataset(good)


def test_wrong_dtype_code(good):
    corrupt(good + ".idx", 17, bytes([9]))
    with pytest.raises(IndexedFormatError, match="unknown dtype code 9"):
        IndexedDataset(good)


def test_counts_disagree(good):
    corrupt(good + ".idx", 18, struct.pack("<Q", 3))
    with pytest.raises(IndexedFormatError, match="g.idx: 82 bytes, but 3 sequences"):
        IndexedDataset(good)


def test_truncated_idx(good):
    with open(good + ".idx", "r+b") as fh:
        fh.truncate(20)
    with pytest.raises(IndexedFormatError, match="shorter than the 34-byte header"):
        IndexedDataset(good)


def test_pointer_mismatch(good):
    corrupt(good + ".idx", 34 + 8 + 8, struct.pack("<q", 12))
    with pytest.raises(IndexedFormatError, match="pointers disagree"):
        IndexedDataset(good)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(str(tmp_path / "nothing"))


def test_merge(tmp_path):
    a = write(tmp_path / "a", [[1, 2], [3]])
    b = write(tmp_path / "b", [[4, 5, 6]])
    merge_datasets([a, b], str(tmp_path / "m"))
    m = IndexedDataset(str(tmp_path / "m"))
    assert [list(m[i]) for i in range(len(m))] == [[1, 2], [3], [4, 5, 6]]
    assert list(m.doc_index) == [0, 1, 2, 3]


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_megatron_core_reads_ours(tmp_path):
    rng = np.random.RandomState(0)
    docs = [rng.randint(0, 60000, size=rng.randint(0, 50)).tolist() for _ in range(200)]
    prefix = write(tmp_path / "ours", docs)
    theirs = _megatron().IndexedDataset(prefix)
    nonempty = [d for d in docs if d]
    assert len(theirs) == len(nonempty)
    for i, d in enumerate(nonempty):
        assert theirs[i].tolist() == d
    ours = IndexedDataset(prefix)
    assert np.array_equal(theirs.document_indices, ours.doc_index)
    assert np.array_equal(theirs.sequence_lengths, ours.lengths)


def test_we_read_megatron_core(tmp_path):
    torch = require("torch")
    mc = _megatron()
    rng = np.random.RandomState(1)
    prefix = str(tmp_path / "theirs")
    builder = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    docs = []
    for _ in range(100):
        sents = [rng.randint(0, 100000, size=rng.randint(1, 20)).tolist() for _ in range(rng.randint(1, 4))]
        docs.append(sents)
        builder.add_document(torch.tensor([t for s in sents for t in s]), [len(s) for s in sents])
    builder.finalize(prefix + ".idx")
    ours = IndexedDataset(prefix)
    flat = [s for d in docs for s in d]
    assert len(ours) == len(flat) and ours.dtype == np.int32
    assert all(ours[i].tolist() == s for i, s in enumerate(flat))
    assert list(ours.doc_index) == list(np.cumsum([0] + [len(d) for d in docs]))
