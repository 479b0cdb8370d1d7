"""LoRA adapters, split the way the layer they sit beside is split, so that every layout computes one process's
``y = W x + (alpha / r) B A dropout(x)``.

- Beside a column-parallel layer (``W`` split by output rows): ``A`` ``[r, in]`` whole on every TP rank, ``B``
  ``[out / TP, r]`` split like ``W``. ``A`` sees the entered (replicated or gathered) input and each rank's ``B``
  back-propagates only its outputs' share, so ``A``'s gradient is summed over TP.
- Beside a row-parallel layer (``W`` split by input columns): ``A`` ``[r, in / TP]`` split like ``W``, ``B`` ``[out,
  r]`` whole. Each rank adds ``B A_t x_t``, a partial product, before the layer's all-reduce (or reduce-scatter),
  which sums them with ``W``'s: no collective of its own. ``B``'s gradient is summed over TP.
- Beside a replicated layer (multi-latent attention's down-projections): both whole; under sequence parallelism
  they see this rank's tokens only, so both gradients are summed over TP, as the layer's own weight's.
- Beside experts (``[E, in, out]`` stacks): ``A`` ``[E, in, r]`` and ``B`` ``[E, r, out]``, split over the
  expert-parallel ranks with the experts.

"Summed over TP" is the ``sequence_parallel`` mark the optimizers already read. ``B`` starts at zero (the adapted
model starts as the base), ``A`` uniform in ``+-1/sqrt(in)`` (PEFT's default), drawn whole so every layout starts
alike. Adapter parameters carry ``lora`` (checkpoints of a LoRA run hold them alone).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.parallel.random import RNGTracker
from megalm.parallel.state import Topology


def _param(shape, tp_dim: Optional[int], summed: bool, fan_in: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    p.tp_dim, p.sequence_parallel, p.lora, p.fan_in = tp_dim, summed, True, fan_in
    p.padded_rows = p.tied_copy = p.shared_embedding = False  # what the model marks on its own parameters
    return p


class LoRA(nn.Module):
    """The adapter beside one linear layer ``[out, in]`` (whole sizes); ``split``: ``"out"`` (column parallel),
    ``"in"`` (row parallel) or None (replicated, ``sequence_parallel``: the input is this rank's tokens)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 split: Optional[str], topo: Topology, rng: RNGTracker, sequence_parallel: bool = False):
        super().__init__()
        tp, sum_tp = topo.tp, topo.tp > 1
        self.scale, self.dropout, self.rng, self.enabled = alpha / rank, dropout, rng, True
        self.a = _param((rank, in_features // tp if split == "in" else in_features), 1 if split == "in" else None,
                        sum_tp and (split == "out" or (split is None and sequence_parallel)), in_features)
        self.b = _param((out_features // tp if split == "out" else out_features, rank), 0 if split == "out" else None,
                        sum_tp and (split == "in" or (split is None and sequence_parallel)), in_features)
        # the input differs per TP rank (a row-parallel layer's shard, a sequence shard): dropout draws per rank
        self.per_rank_input = split == "in" or (split is None and sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            with self.rng.fork() if self.per_rank_input else contextlib.nullcontext():
                x = F.dropout(x, self.dropout, True)
        return F.linear(F.linear(x, self.a), self.b) * self.scale


class ExpertLoRA(nn.Module):
    """Adapters of one expert stack ``[E_local, in, out]``: ``A`` ``[E_local, in, r]``, ``B`` ``[E_local, r, out]``;
    ``mm(x, weight)`` is the experts' own (grouped) matmul over the rows each expert received."""

    def __init__(self, experts: int, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.scale, self.dropout, self.enabled = alpha / rank, dropout, True
        self.a = _param((experts, in_features, rank), None, False, in_features)
        self.b = _param((experts, rank, out_features), None, False, in_features)
        for p in (self.a, self.b):
            p.expert, p.etp_dim = True, None

    def forward(self, x: torch.Tensor, mm) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, True)
        dtype = x.dtype
        return mm(mm(x, self.a.to(dtype)), self.b.to(dtype)) * self.scale


def active(adapter) -> bool:
    """Whether a layer's adapter (or None) takes part in its forward."""
    return adapter is not None and adapter.enabled
