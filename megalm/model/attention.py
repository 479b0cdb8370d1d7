"""Attention: grouped-query heads (optional QK norms, RoPE, windows, sinks), the KV cache for decoding, and the
attention cores (SDPA, the fused softmax, the unfused reference, the sink softmax); context parallelism's paths are
in ``megalm.parallel.context``.

Each rank holds ``heads / TP`` query heads and ``groups / TP`` key/value heads; attention dropout draws from the
per-rank generator (``rng.fork()``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.kernels.attention_lse import repeat_groups
from megalm.kernels.fused_softmax import fused_softmax
from megalm.model.norm import Norm
from megalm.model.recompute import recomputed
from megalm.model.rope import apply_rope
from megalm.parallel.context import context_attention
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, column_parallel
from megalm.parallel.random import RNGTracker
from megalm.parallel.state import Topology


class KVCache:
    """Keys and values of every layer for incremental decoding (for multi-latent attention its latent and the
    rotated key part the heads share), preallocated for ``capacity`` positions (so a decoding step writes in place
    instead of copying the cache); ``length`` is how many positions it holds.

    ``valid`` (``[batch, capacity]``, optional) marks real positions in a batch of left-padded prompts: padding
    keys are masked out, so each sequence decodes as it would alone."""

    def __init__(self, capacity: int = 0, valid: Optional[torch.Tensor] = None):
        self.capacity, self.valid = capacity, valid
        self.keys, self.values = {}, {}
        self.length = 0
        self._mask = (None, None)  # ((length, queries), mask): every layer of a step asks for the same one

    def update(self, layer: str, k, v):
        end = self.length + k.shape[2]
        if layer not in self.keys or end > self.keys[layer].shape[2]:
            size = max(self.capacity, end)
            keys = k.new_empty(k.shape[:2] + (size,) + k.shape[3:])
            values = v.new_empty(v.shape[:2] + (size,) + v.shape[3:])
            if layer in self.keys:
                keys[:, :, : self.length] = self.keys[layer][:, :, : self.length]
                values[:, :, : self.length] = self.values[layer][:, :, : self.length]
            self.keys[layer], self.values[layer] = keys, values
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def mask(self, queries: int, device) -> Optional[torch.Tensor]:
        """Boolean ``[batch, 1, queries, keys]``: causal, padding keys excluded (a padding query sees itself, so
        no row is empty); None without padding."""
        if self.valid is None:
            return None
        if self._mask[0] == (self.length, queries):
            return self._mask[1]
        keys = self.length + queries
        causal = torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=self.length)
        own = torch.zeros_like(causal)
        own[:, self.length:] = torch.eye(queries, dtype=torch.bool, device=device)
        mask = (causal & self.valid[:, None, None, :keys].to(device)) | own
        self._mask = ((self.length, queries), mask)
        return mask


def unfused_attention(q, k, v, causal_offset: Optional[int], dropout: float, training: bool):
    """softmax(q k^T / sqrt(d) + causal mask) v with fp32 softmax: the reference the fused paths are checked against."""
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal_offset is not None:
        sq, sk = scores.shape[-2:]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(diagonal=causal_offset + 1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, dropout, training)
    return torch.matmul(probs, v)


def sink_attention(q, k, v, sink, allowed, dropout: float, training: bool):
    """Attention whose softmax also holds one logit per head that no key owns (GPT-OSS's sink; Megatron's
    ``learnable`` / ``off-by-one`` softmax): the weights of a row add up to less than one. ``allowed``: boolean,
    broadcast to ``[b, heads, sq, sk]``. Scores and softmax in fp32."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    column = sink.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, column), dim=-1), dim=-1)[..., :-1].to(q.dtype)
    return torch.matmul(F.dropout(probs, dropout, training), v)


def _window(positions: torch.Tensor, keys: int, window: int) -> torch.Tensor:
    """Boolean ``[queries, keys]`` for queries at sequence ``positions``: causal and at most ``window`` positions
    back, the query's own included."""
    i = positions[:, None]
    j = torch.arange(keys, device=positions.device)[None, :]
    return (j <= i) & (j > i - window)


class Attention(nn.Module):
    """Grouped-query attention: ``qkv`` makes this rank's heads (a subclass makes them another way, as multi-latent
    attention does), the core attends (across CP ranks when the sequence is split), ``wo`` sums the heads."""

    def __init__(self, cfg: ModelConfig, topo: Topology, layer: str, rng: RNGTracker):
        super().__init__()
        self.cfg, self.layer, self.rng, self.topo = cfg, layer, rng, topo
        self.index = min(int(layer), cfg.num_layers - 1)  # a multi-token prediction layer is shaped like the last
        self.window = cfg.sliding_window if cfg.window_layers()[self.index] else None  # None: full attention
        self.n_heads = cfg.num_attention_heads // topo.tp
        self.n_kv = cfg.num_query_groups // topo.tp
        self.projections(cfg, topo)
        self.wo = RowParallelLinear(cfg.num_attention_heads * cfg.value_head_dim, cfg.hidden_size, topo,
                                    cfg.add_bias_linear)
        self.sinks = None
        if cfg.softmax_type == "learnable":  # one logit per head, split over TP with the heads
            self.sinks = nn.Parameter(torch.zeros(self.n_heads))
            self.sinks.tp_dim = 0
        if cfg.qk_layernorm:  # shared by every head; each TP rank normalises its own heads: gradients summed over TP
            self.q_norm = Norm(cfg.head_dim, cfg.normalization, cfg.norm_epsilon, topo.tp > 1)
            self.k_norm = Norm(cfg.head_dim, cfg.normalization, cfg.norm_epsilon, topo.tp > 1)

    def projections(self, cfg: ModelConfig, topo: Topology) -> None:
        hd, qkv_bias = cfg.head_dim, cfg.add_bias_linear or cfg.add_qkv_bias
        self.wq = ColumnParallelLinear(cfg.hidden_size, cfg.num_attention_heads * hd, topo, qkv_bias,
                                       input_entered=True)
        self.wk = ColumnParallelLinear(cfg.hidden_size, cfg.num_query_groups * hd, topo, qkv_bias, input_entered=True)
        self.wv = ColumnParallelLinear(cfg.hidden_size, cfg.num_query_groups * hd, topo, qkv_bias, input_entered=True)

    def qkv(self, x, rope, kv_cache: Optional[KVCache]):
        """This rank's queries ``[b, heads, s, d]`` and the keys and values they attend to (with a cache: all
        of them so far)."""
        hd = self.cfg.head_dim
        # the whole sequence, also when x was a sequence-parallel shard
        q, k, v = column_parallel(x, (self.wq, self.wk, self.wv), self.topo)
        b, s = q.shape[:2]
        q, k = q.view(b, s, self.n_heads, hd), k.view(b, s, self.n_kv, hd)
        if self.cfg.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, self.n_kv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)
        return q, k, v

    def heads_out(self, out):
        """The attention output per head, ``[b, heads, s, value width]`` (a cached latent's is expanded here)."""
        return out

    def forward(self, x, rope=None, kv_cache: Optional[KVCache] = None, doc_mask=None):
        """``doc_mask``: boolean ``[b, 1, s, s]`` allowed query-key pairs (packed documents), else causal."""
        past, mask = 0, doc_mask
        if kv_cache is not None:  # before qkv: the update moves the cache's contents, not its length
            past = kv_cache.length
        q, k, v = self.qkv(x, rope, kv_cache)
        b, s = q.shape[0], q.shape[2]
        if kv_cache is not None:
            mask = kv_cache.mask(s, q.device)
            out = self.heads_out(self._attend(q, k, v, past, mask))
        elif self.topo.cp > 1:  # the sequence is split: attention across the CP ranks
            kind = self.topo.cp_comm_type(self.index)
            heads = None  # a2a hands this rank its CP share of the heads, whose sinks it needs
            if kind == "a2a":
                per = self.n_heads // self.topo.cp
                heads = slice(self.topo.cp_rank * per, (self.topo.cp_rank + 1) * per)
            sink = self.sinks if self.sinks is not None else \
                q.new_zeros(self.n_heads) if self.cfg.softmax_type == "off-by-one" else None
            out = context_attention(kind, q, k, v, self.topo, mask[kind],
                                    lambda q, k, v, m, pos: self._attend(q, k, v, 0, m, heads, pos), sink)
        elif self.cfg.recompute_granularity == "selective" and self.training:
            out = recomputed(self._attend, self.rng, q, k, v, 0, mask)
        else:
            out = self._attend(q, k, v, past, mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    def _attend(self, q, k, v, past: int = 0, mask=None, heads: Optional[slice] = None, positions=None):
        """The attention core (scores, softmax, dropout, weighted values): what selective recomputation redoes."""
        dropout = self.cfg.attention_dropout if self.training else 0.0
        with self.rng.fork() if dropout > 0 else contextlib.nullcontext():
            return self._attend_with(q, k, v, past, dropout, mask, heads, positions)

    def _attend_with(self, q, k, v, past: int, dropout: float, mask=None, heads: Optional[slice] = None,
                     positions=None):
        """``heads``: which of this rank's heads ``q`` holds (context parallelism's all-to-all splits them);
        ``positions``: the queries' places in the sequence (default ``past`` on; context parallelism's own)."""
        s = q.shape[2]
        if self.window is not None:  # query i sees keys j with i - window < j <= i
            if positions is None:
                positions = torch.arange(past, past + s, device=q.device)
            mask = _window(positions, k.shape[2], self.window) & (mask if mask is not None else True)
        if self.cfg.softmax_type != "vanilla":
            k, v = repeat_groups(k, v, q.shape[1])
            if mask is None:
                mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=past)
            sink = self.sinks[heads or slice(None)] if self.sinks is not None else q.new_zeros(q.shape[1])
            return sink_attention(q, k, v, sink, mask, dropout, self.training)
        if mask is not None:  # packed documents, a padded batch or a window: an explicit mask
            k, v = repeat_groups(k, v, q.shape[1])
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.cfg.attention_backend == "sdpa":
            if past == 0:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     enable_gqa=k.shape[1] != q.shape[1])
            else:  # decoding: the new queries see every cached position up to their own
                mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=past)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     enable_gqa=k.shape[1] != q.shape[1])
            return out
        k, v = repeat_groups(k, v, q.shape[1])
        if self.cfg.attention_backend == "fused" and past == 0:
            probs = fused_softmax(torch.matmul(q, k.transpose(-1, -2)), 1.0 / math.sqrt(q.shape[-1]), causal=True)
            return torch.matmul(F.dropout(probs, dropout, self.training), v)
        return unfused_attention(q, k, v, past, dropout, self.training)
