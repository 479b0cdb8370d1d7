"""The normalisation layers: LayerNorm and RMSNorm, marked for sequence parallelism."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Norm(nn.Module):
    """LayerNorm (weight and bias) or RMSNorm (weight only)."""

    def __init__(self, dim: int, kind: str, eps: float, sequence_parallel: bool = False):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "LayerNorm" else None
        for p in self.parameters():  # under SP each rank normalises only its shard: gradients summed over TP
            p.sequence_parallel = sequence_parallel

    def forward(self, x):
        if self.kind == "LayerNorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
