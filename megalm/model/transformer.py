"""One pre-norm decoder block: attention (``attention.py``, or multi-latent attention, ``mla.py``) and an MLP (GELU
or SwiGLU, or a mixture of experts, ``moe.py``).

Linear layers are the tensor-parallel ones; each rank holds ``ffn / TP`` MLP columns. Under sequence parallelism
the block's input and output are this rank's sequence shard; the layers gather and scatter. Dropout on activations
that differ per TP rank draws from the per-rank generator (``rng.fork()``).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.activations import gated
from megalm.model.attention import Attention, KVCache
from megalm.model.mla import MultiLatentAttention
from megalm.model.norm import Norm
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, column_parallel
from megalm.parallel.random import RNGTracker
from megalm.parallel.state import Topology

__all__ = ["Block", "KVCache", "MLP", "Norm", "hidden_dropout"]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, topo: Topology, ffn_hidden_size: Optional[int] = None):
        """``ffn_hidden_size``: another width than the model's (an MoE layer's shared expert)."""
        super().__init__()
        bias, ffn = cfg.add_bias_linear, ffn_hidden_size or cfg.ffn_hidden_size
        self.cfg, self.topo, self.swiglu, self.approximate = cfg, topo, cfg.swiglu, cfg.gelu_approximation
        self.w1 = ColumnParallelLinear(cfg.hidden_size, ffn, topo, bias, input_entered=True)
        if self.swiglu:
            self.w3 = ColumnParallelLinear(cfg.hidden_size, ffn, topo, bias, input_entered=True)
        self.w2 = RowParallelLinear(ffn, cfg.hidden_size, topo, bias)

    def forward(self, x):
        if self.swiglu:
            return self.w2(gated(self.cfg, *column_parallel(x, (self.w1, self.w3), self.topo)))
        return self.w2(F.gelu(column_parallel(x, (self.w1,), self.topo)[0], approximate=self.approximate))


def hidden_dropout(x, p: float, training: bool, topo: Topology, rng: RNGTracker):
    """Dropout on the residual stream: replicated across TP (same masks from the shared generator), or under
    sequence parallelism on this rank's shard (its own generator)."""
    if not training or p == 0:
        return x
    with rng.fork() if topo.sequence_parallel else contextlib.nullcontext():
        return F.dropout(x, p, True)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, topo: Topology, layer: str, rng: RNGTracker, moe_stats=None):
        """With ``moe_stats`` (an MoE layer, ``megalm.model.moe``) the MLP is a mixture of experts."""
        super().__init__()
        sp = topo.sequence_parallel
        self.topo, self.rng = topo, rng
        self.attention_norm = Norm(cfg.hidden_size, cfg.normalization, cfg.norm_epsilon, sp)
        self.attention = (MultiLatentAttention if cfg.multi_latent_attention else Attention)(cfg, topo, layer, rng)
        self.mlp_norm = Norm(cfg.hidden_size, cfg.normalization, cfg.norm_epsilon, sp)
        if moe_stats is None:
            self.mlp = MLP(cfg, topo)
        else:
            from megalm.model.moe import MoELayer

            shared = cfg.moe_shared_expert_intermediate_size
            self.mlp = MoELayer(cfg, topo, layer, moe_stats, MLP(cfg, topo, shared) if shared else None)
        self.dropout = cfg.hidden_dropout

    def forward(self, x, rope=None, kv_cache=None, doc_mask=None):
        drop = lambda y: hidden_dropout(y, self.dropout, self.training, self.topo, self.rng)  # noqa: E731
        x = x + drop(self.attention(self.attention_norm(x), rope, kv_cache, doc_mask))
        return x + drop(self.mlp(self.mlp_norm(x)))
