"""GPT training samples over an indexed dataset, with Megatron's split, epoch, sample and shuffle semantics.

A sample is ``seq_length + 1`` consecutive tokens of the shuffled, epoch-repeated document stream
(``tokens = x[:-1]``, ``labels = x[1:]``); consecutive samples share one token and cross document boundaries.
The three index arrays are cached as ``.npy`` under a hash of everything they depend on.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megalm.data.index_builders import build_blending_indices, build_sample_idx
from megalm.data.indexed import IndexedDataset

log = logging.getLogger("megalm")

SPLIT_NAMES = ("train", "valid", "test")


class DatasetError(ValueError):
    pass


def split_document_ranges(num_docs: int, fractions: Sequence[float]) -> List[Tuple[int, int]]:
    """Contiguous document ranges, each ``round(fraction x count)``, the rounding error taken off the ends."""
    bounds = [0]
    for frac in fractions:
        bounds.append(bounds[-1] + int(round(frac * float(num_docs))))
    diff = bounds[-1] - num_docs
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(len(fractions))]


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        doc_idx = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        rng.shuffle(doc_idx)
        return doc_idx
    first = build_document_index(documents, num_epochs - 1, rng, False)
    last = build_document_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int):
    """(document index, sample index, shuffle index), exactly as Megatron's GPTDataset builds them."""
    tokens_per_epoch = int(np.sum(np.asarray(sizes, dtype=np.int64)[documents]))
    if tokens_per_epoch <= seq_length:
        raise DatasetError(f"{tokens_per_epoch} tokens in the split are too few for one sample of "
                           f"{seq_length + 1} tokens")
    needed = num_samples * seq_length + 1
    num_epochs = max(1, math.ceil(needed / tokens_per_epoch))
    separate_final_epoch = False
    samples_sans_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    if num_epochs > 1:
        samples_from_final = num_samples - samples_sans_final
        samples_per_epoch = (tokens_per_epoch - 1) // seq_length
        separate_final_epoch = samples_from_final < int(0.80 * samples_per_epoch)
    rng = np.random.RandomState(seed)
    doc_idx = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch)
    total = sample_idx.shape[0] - 1
    first = samples_sans_final if separate_final_epoch else total
    shuffle_idx = build_shuffle_index(first, total, rng)
    return doc_idx, sample_idx, shuffle_idx


def _save_npy(path: str, array: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


@dataclass
class IndexCache:
    """Where cached indices live, and how ranks share them: ``is_builder`` writes, the others wait on
    ``barrier`` and memory-map what it wrote."""

    directory: Optional[str] = None
    is_builder: bool = True
    barrier: Optional[Callable[[], None]] = None

    def path(self, prefix: str) -> str:
        return self.directory or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")


def check_token_ids(indexed: IndexedDataset, vocab_size: int, cache: IndexCache) -> None:
    """Stop when the dataset holds a token id outside the tokenizer's vocabulary: such ids would train padding
    rows, predict nothing, or fail deep in the embedding. The largest id is computed once per dataset version
    and cached beside the indices."""
    path = os.path.join(cache.path(indexed.prefix), f"{indexed.fingerprint}-max_token_id.json")
    if cache.is_builder and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump({"prefix": os.path.abspath(indexed.prefix), "max_token_id": indexed.max_token_id()}, fh)
        os.replace(path + ".tmp", path)
    if cache.barrier is not None:
        cache.barrier()
    with open(path) as fh:
        largest = json.load(fh)["max_token_id"]
    if largest >= vocab_size:
        raise DatasetError(f"{indexed.prefix}.bin: token id {largest} is outside the tokenizer's vocabulary of "
                           f"{vocab_size} ids (ids 0..{vocab_size - 1}); was it preprocessed with another "
                           f"tokenizer?")


class GPTDataset:
    def __init__(self, indexed: IndexedDataset, sequences: np.ndarray, num_samples: int, seq_length: int,
                 seed: int, name: str, fingerprint: str, cache: IndexCache):
        self.indexed, self.seq_length, self.name = indexed, seq_length, name
        description = {"class": "GPTDataset", "prefix": os.path.abspath(indexed.prefix),
                       "data": indexed.fingerprint, "split": name,
                       "sequences": [int(sequences[0]), int(sequences[-1]) + 1], "num_samples": num_samples,
                       "seq_length": seq_length, "seed": seed, "tokenizer": fingerprint}
        key = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
        directory = cache.path(indexed.prefix)
        paths = [os.path.join(directory, f"{key}-{part}.npy") for part in ("doc_idx", "sample_idx", "shuffle_idx")]
        if cache.is_builder and not all(os.path.exists(p) for p in paths):
            log.info("building %s indices for %s (%d samples) into %s", name, indexed.prefix, num_samples,
                     directory)
            arrays = build_indices(indexed.lengths, sequences, num_samples, seq_length, seed)
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, f"{key}-description.json"), "w") as fh:
                json.dump(description, fh, indent=1)
            for path, array in zip(paths, arrays):
                _save_npy(path, array)
        if cache.barrier is not None:
            cache.barrier()
        self.doc_idx, self.sample_idx, self.shuffle_idx = (np.load(p, mmap_mode="r") for p in paths)
        if len(self) < num_samples:
            raise DatasetError(f"{indexed.prefix} ({name}): cached index has {len(self)} samples, "
                               f"{num_samples} needed")

    def __len__(self) -> int:
        return self.shuffle_idx.shape[0]

    def __getitem__(self, idx: int) -> np.ndarray:
        """``seq_length + 1`` token ids of sample ``idx``."""
        i = int(self.shuffle_idx[idx])
        (doc_f, off_f), (doc_l, off_l) = self.sample_idx[i], self.sample_idx[i + 1]
        get, doc_idx = self.indexed.get, self.doc_idx
        if doc_f == doc_l:
            return np.asarray(get(int(doc_idx[doc_f]), int(off_f), int(off_l - off_f + 1)), dtype=np.int64)
        parts = [get(int(doc_idx[doc_f]), int(off_f))]
        parts += [get(int(doc_idx[j])) for j in range(doc_f + 1, doc_l)]
        parts.append(get(int(doc_idx[doc_l]), 0, int(off_l) + 1))
        return np.concatenate(parts).astype(np.int64)


class BlendedDataset:
    """Samples drawn from several datasets in proportion to their weights (deterministic largest-lag rule)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(np.asarray(weights), size)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


def split_sample_counts(train_iters: int, global_batch_size: int, eval_iters: int):
    """Samples each split must provide: every training step; and one validation run, since every validation
    run scores the same samples so that its losses are comparable along the run. The test split is not used."""
    return [train_iters * global_batch_size, eval_iters * global_batch_size, 0]


def indexed_datasets(dataset) -> list:
    """The indexed datasets a (blended) GPT dataset reads from (none for other datasets)."""
    if isinstance(dataset, BlendedDataset):
        return [d for part in dataset.datasets for d in indexed_datasets(part)]
    return [dataset.indexed] if isinstance(dataset, GPTDataset) else []


def build_datasets(blend: Sequence[Tuple[float, str]], split: Sequence[float], sample_counts: Sequence[int],
                   seq_length: int, seed: int, fingerprint: str, cache: IndexCache, vocab_size: Optional[int] = None):
    """Train, valid and test datasets (None where the split or the sample count is zero); with ``vocab_size``,
    every dataset's token ids are checked against it first."""
    indexed = [(w, IndexedDataset(prefix)) for w, prefix in blend]
    if vocab_size is not None:
        for _, ds in indexed:
            check_token_ids(ds, vocab_size, cache)
    out = []
    for split_i, (name, count) in enumerate(zip(SPLIT_NAMES, sample_counts)):
        if count == 0 or split[split_i] == 0:
            out.append(None)
            continue
        parts = []
        for weight, ds in indexed:
            per_ds = count if len(indexed) == 1 else int(math.ceil(count * weight * 1.005))
            first_doc, last_doc = split_document_ranges(ds.num_documents, split)[split_i]
            sequences = np.arange(ds.doc_index[first_doc], ds.doc_index[last_doc], dtype=np.int32)
            if sequences.size == 0:
                raise DatasetError(f"{ds.prefix}: the {name} split (--split) has no documents out of "
                                   f"{ds.num_documents}")
            try:
                parts.append(GPTDataset(ds, sequences, per_ds, seq_length, seed, name, fingerprint, cache))
            except DatasetError as exc:
                raise DatasetError(f"{ds.prefix} ({name} split): {exc}") from None
        out.append(parts[0] if len(parts) == 1 else BlendedDataset(parts, [w for w, _ in indexed], count))
    return out
