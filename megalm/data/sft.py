"""Supervised fine-tuning data: JSON lines of ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role":
..., "content": ...}, ...]}``, tokenized, packed into fixed-length samples, with loss only on response tokens.

Each example becomes ``prompt tokens + response tokens + eod``; the loss weight is 1 on the response and the eod
(what the model must produce) and 0 on the prompt. Chat messages are rendered ``role: content`` one per line, and
assistant turns carry the loss. Examples are packed greedily into samples of ``seq_length + 1`` tokens (an example
longer than that is cut); the trainer then resets positions and masks attention at every eod, so packed examples
do not see each other. A sample is an array ``[2, seq_length + 1]``: token ids and loss weights for the token
predicted at each position.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from megalm.data.gpt_dataset import DatasetError
from megalm.data.jsonl import JsonlError, check_text, has_surrogate_escape, iter_lines, parse_object


def render(example: dict, where: str) -> List[Tuple[str, bool]]:
    """(text, carries loss) pieces of one example."""
    if "messages" in example:
        pieces = []
        for m in example["messages"]:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DatasetError(f"{where}: every message needs 'role' and 'content'")
            assistant = m["role"] == "assistant"
            pieces.append((f"{m['role']}: ", False))
            pieces.append((str(m["content"]) + "\n", assistant))
        if not any(loss for _, loss in pieces):
            raise DatasetError(f"{where}: no assistant message to learn from")
        return pieces
    if "prompt" in example and "response" in example:
        return [(str(example["prompt"]), False), (str(example["response"]), True)]
    raise DatasetError(f"{where}: expected 'prompt' and 'response', or 'messages'")


def tokenize_examples(path: str, tokenizer) -> List[Tuple[np.ndarray, np.ndarray]]:
    out = []
    try:
        for _, lineno, line in iter_lines([path]):
            where = f"{path}:{lineno}"
            example = parse_object(line, where)
            if example is None:
                continue
            ids, weights, suspect = [], [], has_surrogate_escape(line)
            for text, loss in render(example, where):
                if suspect:
                    check_text(text, "the example", where)
                piece = tokenizer.tokenize(text)
                ids += piece
                weights += [float(loss)] * len(piece)
            ids.append(tokenizer.eod)
            weights.append(1.0)
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(weights, dtype=np.float32)))
    except JsonlError as exc:
        raise DatasetError(str(exc)) from None
    if not out:
        raise DatasetError(f"{path}: no examples")
    return out


def pack(examples, seq_length: int, pad_id: int) -> np.ndarray:
    """Greedy packing into ``[n, 2, seq_length + 1]``; weights are for the token at each position (the label
    of the previous one); padding has weight 0."""
    size, samples, cur_ids, cur_w = seq_length + 1, [], [], []

    def flush():
        if cur_ids:
            ids = np.full(size, pad_id, dtype=np.int64)
            w = np.zeros(size, dtype=np.float32)
            ids[: len(cur_ids)], w[: len(cur_w)] = cur_ids, cur_w
            samples.append(np.stack([ids, w.astype(np.float64)]))

    for ids, weights in examples:
        ids, weights = list(ids[:size]), list(weights[:size])
        if len(cur_ids) + len(ids) > size:
            flush()
            cur_ids, cur_w = [], []
        cur_ids += ids
        cur_w += weights
    flush()
    return np.stack(samples)


class SFTDataset:
    """Packed samples, reshuffled every epoch (deterministic in ``seed``), indexable without bound."""

    def __init__(self, samples: np.ndarray, seed: int):
        self.samples, self.seed = samples, seed
        self._orders = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> np.ndarray:
        epoch, i = divmod(idx, len(self.samples))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng(self.seed + epoch).permutation(len(self.samples))
        return self.samples[self._orders[epoch][i]]


def build_sft_datasets(path: str, tokenizer, seq_length: int, split: List[float], seed: int):
    """Train and valid datasets from the examples, divided by ``--split`` (valid None when its share is 0)."""
    examples = tokenize_examples(path, tokenizer)
    n_valid = int(round(len(examples) * split[1])) if split[1] > 0 else 0
    n_valid = min(max(n_valid, 1 if split[1] > 0 else 0), len(examples) - 1)
    train = pack(examples[: len(examples) - n_valid], seq_length, tokenizer.eod)
    valid = pack(examples[len(examples) - n_valid:], seq_length, tokenizer.eod) if n_valid else None
    return SFTDataset(train, seed), (SFTDataset(valid, seed) if valid is not None else None)
