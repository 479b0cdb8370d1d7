"""GPT sample indices against a plain Python transcription of Megatron's loops; dataset and sampler semantics."""
import numpy as np
import pytest

from megalm.data import index_builders as ib
from megalm.data.gpt_dataset import (BlendedDataset, GPTDataset, IndexCache, build_document_index, build_indices,
                                     split_document_ranges)
from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter
from megalm.data.loader import global_batch, micro_batch_sample_ids
from megalm.kernels import extension


def reference_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    """helpers.cpp's build_sample_idx, line by line in Python (add_extra_token = 1)."""
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    out = [(0, 0)]
    pos, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining != 0:
            doc_len = sizes[doc_idx[pos]] - offset
            remaining -= doc_len
            if remaining <= 0:
                offset += remaining + doc_len - 1
                remaining = 0
            else:
                pos += 1
                offset = 0
        out.append((pos, offset))
    return np.array(out)


def reference_blending(weights, size):
    current = [0] * len(weights)
    idx, sample = [], []
    for i in range(size):
        lags = [w * max(i, 1) - c for w, c in zip(weights, current)]
        best = lags.index(max(lags))
        idx.append(best)
        sample.append(current[best])
        current[best] += 1
    return idx, sample


@pytest.mark.parametrize("seed", range(6))
def test_sample_idx_matches_reference(seed):
    rng = np.random.RandomState(seed)
    sizes = rng.randint(0, 30, size=rng.randint(5, 60)).astype(np.int32)
    sizes[0] = max(sizes[0], 1)
    epochs = rng.randint(1, 4)
    doc_idx = rng.permutation(np.tile(np.arange(len(sizes), dtype=np.int32), epochs))
    seq = int(rng.randint(1, 20))
    tpe = int(sizes.sum())
    ref = reference_sample_idx(sizes, doc_idx, seq, epochs, tpe)
    assert np.array_equal(ib.build_sample_idx_numpy(sizes, doc_idx, seq, epochs, tpe), ref)
    ext = extension()
    assert ext is not None, "megalm._C is not built"
    assert np.array_equal(ext.build_sample_idx(sizes, doc_idx, seq, epochs, tpe, 1), ref)


# the extension has a branch-free loop per dataset count up to 8 and a general one above: both are covered
_RANDOM_WEIGHTS = [np.random.RandomState(n).dirichlet(np.ones(n)).tolist() for n in (5, 8, 9, 13)]


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.3, 0.7], [0.1, 0.2, 0.3, 0.4], [1.0], *_RANDOM_WEIGHTS,
                                     [1 / 3] * 3, [0.1] * 10])
def test_blending_matches_reference(weights):
    ref_idx, ref_sample = reference_blending(weights, 500)
    for impl in (ib.build_blending_indices_numpy, extension().build_blending_indices):
        idx, sample = impl(np.array(weights), 500)
        assert idx.tolist() == ref_idx and sample.tolist() == ref_sample
    counts = np.bincount(idx, minlength=len(weights)) / 500
    assert np.allclose(counts, weights, atol=2 / 500)
    assert sample.dtype == np.int64 and idx.dtype == np.int16


def test_split_ranges():
    assert split_document_ranges(1000, [0.969, 0.03, 0.001]) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(10, [0.5, 0.5, 0.0]) == [(0, 5), (5, 10), (10, 10)]


def test_separate_final_epoch():
    rng = np.random.RandomState(0)
    docs = np.arange(10, dtype=np.int32)
    idx = build_document_index(docs, 3, rng, separate_final_epoch=True)
    assert sorted(idx[20:].tolist()) == list(range(10))  # the last epoch is shuffled on its own
    sizes = np.full(10, 10, dtype=np.int32)
    _, sample_idx, shuffle = build_indices(sizes, docs, num_samples=11, seq_length=10, seed=1)
    # 11 samples need 2 epochs; the 2nd supplies 2 of its 9, under 80%: shuffled separately at the end
    first = (100 - 1) // 10
    assert sorted(shuffle[:first].tolist()) == list(range(first))
    assert len(shuffle) == sample_idx.shape[0] - 1


@pytest.fixture
def small_dataset(tmp_path):
    rng = np.random.RandomState(3)
    w = IndexedDatasetWriter(str(tmp_path / "d"), np.int32)
    docs = [rng.randint(0, 1000, size=rng.randint(1, 40)) for _ in range(50)]
    for d in docs:
        w.add_document(d)
    w.finalize()
    return IndexedDataset(str(tmp_path / "d")), docs


def test_samples_are_the_shuffled_document_stream(tmp_path, small_dataset):
    ds, docs = small_dataset
    seq = 16
    gpt = GPTDataset(ds, np.arange(50, dtype=np.int32), 100, seq, 7, "train", "tok", IndexCache(str(tmp_path / "c")))
    stream = np.concatenate([docs[d] for d in gpt.doc_idx])
    for i in range(len(gpt)):
        s = int(gpt.shuffle_idx[i])
        assert np.array_equal(gpt[i], stream[s * seq: s * seq + seq + 1])
    # a second build reads the cache (same arrays, nothing rebuilt)
    again = GPTDataset(ds, np.arange(50, dtype=np.int32), 100, seq, 7, "train", "tok", IndexCache(str(tmp_path / "c"), is_builder=False))
    assert np.array_equal(again.shuffle_idx, gpt.shuffle_idx)


def test_blended_dataset(tmp_path, small_dataset):
    ds, _ = small_dataset
    parts = [GPTDataset(ds, np.arange(a, b, dtype=np.int32), 60, 8, 1, n, "tok", IndexCache(str(tmp_path / "c")))
             for a, b, n in ((0, 25, "train"), (25, 50, "valid"))]
    blend = BlendedDataset(parts, [0.25, 0.75], 40)
    assert np.bincount(blend.dataset_index).tolist() == [10, 30]
    assert np.array_equal(blend[1], parts[blend.dataset_index[1]][blend.dataset_sample_index[1]])


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_global_order_does_not_depend_on_dp(dp):
    single = [list(r) for r in micro_batch_sample_ids(32, 16, 2, 0, 1)]
    spread = [list(r) for rank in range(dp) for r in micro_batch_sample_ids(32, 16, 2, rank, dp)]
    assert sorted(single) == sorted(spread) and sum(len(r) for r in spread) == 16


def test_global_batch_tensors(tmp_path, small_dataset):
    ds, _ = small_dataset
    gpt = GPTDataset(ds, np.arange(50, dtype=np.int32), 40, 8, 1, "train", "tok", IndexCache(str(tmp_path / "c")))
    mbs = global_batch(gpt, 0, 8, 2)
    assert len(mbs) == 4 and mbs[0]["tokens"].shape == (2, 8)
    assert (mbs[0]["tokens"][:, 1:] == mbs[0]["labels"][:, :-1]).all()


class _Fixed:
    """A 'dataset' of given samples, for collate."""

    def __init__(self, samples):
        self.samples = [np.asarray(s) for s in samples]

    def __getitem__(self, i):
        return self.samples[i]


def test_eod_loss_mask_and_position_reset():
    from megalm.data.loader import collate

    eod = 9
    batch = collate(_Fixed([[1, 2, 9, 3, 4, 9, 5, 6], [9, 1, 2, 3, 4, 5, 6, 7]]), [0, 1], eod=eod,
                    eod_mask_loss=True, reset_position_ids=True)
    assert batch["tokens"].tolist() == [[1, 2, 9, 3, 4, 9, 5], [9, 1, 2, 3, 4, 5, 6]]
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4, 5]]
    plain = collate(_Fixed([[1, 2, 9, 3]]), [0], eod=eod)
    assert plain["loss_mask"].tolist() == [[1, 1, 1]] and "position_ids" not in plain


def test_per_split_data_paths(tmp_path, dataset_prefix, bpe_flags):
    """--train-data-path / --valid-data-path: each split from its own files, used whole."""
    import json

    from conftest import tiny_train_flags
    from megalm.pretrain import main

    flags = [str(f) for f in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "4")]
    i = flags.index("--data-path")
    flags = flags[:i] + flags[i + 2:]
    metrics = tmp_path / "m.jsonl"
    assert main(flags + ["--train-data-path", "0.5", dataset_prefix, "0.5", dataset_prefix, "--valid-data-path",
                         dataset_prefix, "--metrics-file", str(metrics)]) == 0
    rows = [json.loads(line) for line in open(metrics)]
    assert [r["iteration"] for r in rows if "valid_loss" in r] == [4]
    assert main(flags + ["--valid-data-path", dataset_prefix]) == 2
