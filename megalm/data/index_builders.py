"""Sample and blending indices: the C++ helpers of ``megalm._C`` when built, else exact numpy equivalents.

Both implementations follow Megatron's ``helpers.cpp`` semantics; tests check that they agree element for element
with a plain Python transcription of the loops.
"""
from __future__ import annotations

import numpy as np

from megalm.kernels import extension


def build_sample_idx_numpy(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_epochs: int,
                           tokens_per_epoch: int, add_extra_token: int = 1) -> np.ndarray:
    """``[N+1, 2]`` rows (position in ``doc_idx``, token offset) where sample i starts.

    Sample i spans global token positions ``[i*L, i*L + L + add_extra_token)`` of the concatenated documents, so
    its start is the document (in ``doc_idx`` order) holding position ``i*L``; empty documents are stepped over.
    """
    num_samples = (num_epochs * tokens_per_epoch - add_extra_token) // seq_length
    doc_lengths = np.asarray(sizes, dtype=np.int64)[doc_idx]
    ends = np.cumsum(doc_lengths)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    row = np.searchsorted(ends, starts, side="right")
    out = np.empty((num_samples + 1, 2), dtype=np.int64)
    out[:, 0] = row
    out[:, 1] = starts - (ends[row] - doc_lengths[row])
    out[0] = 0
    return out


def build_blending_indices_numpy(weights: np.ndarray, size: int):
    """For each output sample: which dataset, and which sample of it. Greedy largest-lag, no random draws."""
    weights = np.asarray(weights, dtype=np.float64)
    dataset_index = np.empty(size, dtype=np.int16 if len(weights) < 2**15 else np.int32)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    current = np.zeros(len(weights), dtype=np.int64)
    for i in range(size):
        lag = weights * max(i, 1) - current
        chosen = int(np.argmax(lag))
        dataset_index[i] = chosen
        dataset_sample_index[i] = current[chosen]
        current[chosen] += 1
    return dataset_index, dataset_sample_index


def build_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, add_extra_token=1):
    ext = extension()
    if ext is not None:
        return ext.build_sample_idx(np.ascontiguousarray(sizes, dtype=np.int32),
                                    np.ascontiguousarray(doc_idx, dtype=np.int32),
                                    seq_length, num_epochs, tokens_per_epoch, add_extra_token)
    return build_sample_idx_numpy(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch, add_extra_token)


def build_blending_indices(weights, size):
    ext = extension()
    if ext is not None:
        return ext.build_blending_indices(np.ascontiguousarray(weights, dtype=np.float64), size)
    return build_blending_indices_numpy(weights, size)
