"""Batches by consumed samples: the global order never depends on the data-parallel size.

Global batch ``b`` is samples ``[c, c + G)`` with ``c`` the samples consumed before it. It is cut into
micro-batches of ``M`` consecutive samples; micro-batch ``j`` of data-parallel rank ``r`` is
``c + (j * D + r) * M + [0, M)``, so every layout sees the same micro-batches, only spread differently.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch


def micro_batch_sample_ids(consumed: int, global_batch: int, micro_batch: int, dp_rank: int,
                           dp_size: int) -> List[range]:
    per_step = micro_batch * dp_size
    return [range(consumed + j * per_step + dp_rank * micro_batch,
                  consumed + j * per_step + (dp_rank + 1) * micro_batch)
            for j in range(global_batch // per_step)]


def collate(dataset, ids, eod: Optional[int] = None, eod_mask_loss: bool = False,
            reset_position_ids: bool = False, reset_attention_mask: bool = False) -> dict:
    """Stack samples into ``tokens`` and ``labels`` (int64, ``[micro_batch, seq_length]``) and a float
    ``loss_mask``; with ``reset_position_ids`` also ``position_ids`` that restart after each ``eod`` token, with
    ``reset_attention_mask`` ``document_ids`` (attention stays within a document). Packed fine-tuning samples
    (dicts: ``megalm.data.sft.PackedDataset``) carry their own targets and documents: ``documents``."""
    items = [dataset[i] for i in ids]
    if isinstance(items[0], dict):
        return documents(items)
    x = torch.from_numpy(np.stack(items))
    tokens = x[:, :-1].contiguous()
    batch = {"tokens": tokens, "labels": x[:, 1:].contiguous(), "loss_mask": torch.ones(tokens.shape)}
    if reset_attention_mask:
        is_eod = (tokens == eod).long()
        batch["document_ids"] = torch.cumsum(is_eod, dim=1) - is_eod  # an eod belongs to the document it ends
    if eod_mask_loss:
        batch["loss_mask"][tokens == eod] = 0.0
    if reset_position_ids:
        is_eod = (tokens == eod).long()
        # a document starts just after each eod
        starts = torch.zeros_like(tokens, dtype=torch.bool)
        starts[:, 1:] = is_eod[:, :-1].bool()
        batch["position_ids"] = positions_from_starts(starts)
    return batch


def positions_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """Each token's place in its document, from where documents start (``[b, s]`` bool)."""
    pos = torch.arange(starts.shape[1]).expand_as(starts)
    start = torch.where(starts, pos, torch.zeros_like(pos))
    return pos - torch.cummax(start, dim=1).values


def documents(items: list) -> dict:
    """A micro-batch of packed samples (``ids``, ``targets``, ``docs`` rows of ``seq + 1`` tokens, ``index``):
    tokens and labels, the loss on the labels that are targets, positions and attention within each document,
    and ``sample_index`` (each row's sample, for values kept per sample)."""
    ids = torch.from_numpy(np.stack([it["ids"] for it in items]).astype(np.int64))
    docs = torch.from_numpy(np.stack([it["docs"] for it in items]).astype(np.int64))[:, :-1].contiguous()
    targets = np.stack([it["targets"] for it in items])
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "loss_mask": torch.from_numpy(targets[:, 1:].astype(np.float32)).contiguous(),
            "document_ids": docs, "position_ids": positions_from_starts(starts),
            "sample_index": torch.tensor([int(it["index"]) for it in items])}


def global_batch(dataset, consumed: int, global_batch_size: int, micro_batch: int, dp_rank: int = 0,
                 dp_size: int = 1, **collate_options) -> List[dict]:
    """This rank's micro-batches of the global batch that starts after ``consumed`` samples."""
    return [collate(dataset, ids, **collate_options)
            for ids in micro_batch_sample_ids(consumed, global_batch_size, micro_batch, dp_rank, dp_size)]
