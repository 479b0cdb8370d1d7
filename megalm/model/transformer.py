"""One pre-norm decoder block: attention (causal, grouped-query, optional RoPE) and an MLP (GELU or SwiGLU).

Linear layers are the tensor-parallel ones; each rank holds ``heads / TP`` query heads, ``groups / TP`` key/value
heads and ``ffn / TP`` MLP columns. Under sequence parallelism the block's input and output are this rank's
sequence shard; the layers gather and scatter. Dropout on activations that differ per TP rank draws from the
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
from megalm.kernels.fused_softmax import fused_softmax
from megalm.model.activations import gated
from megalm.model.recompute import recomputed
from megalm.model.rope import apply_rope
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp_region
from megalm.parallel.context import context_attention
from megalm.parallel.random import RNGTracker
from megalm.parallel.state import Topology


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


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated for ``capacity`` positions (so a
    decoding step writes in place instead of copying the cache); ``length`` is how many positions it holds.

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


def _window(queries: int, keys: int, past: int, window: int, device) -> torch.Tensor:
    """Boolean ``[queries, keys]``: causal and at most ``window`` positions back, the query's own included."""
    i = torch.arange(past, past + queries, device=device)[:, None]
    j = torch.arange(keys, device=device)[None, :]
    return (j <= i) & (j > i - window)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, topo: Topology, layer: str, rng: RNGTracker):
        super().__init__()
        self.cfg, self.layer, self.rng = cfg, layer, rng
        self.window = cfg.sliding_window if cfg.window_layers()[int(layer)] else None  # None: full attention
        hd = cfg.head_dim
        self.n_heads = cfg.num_attention_heads // topo.tp
        self.n_kv = cfg.num_query_groups // topo.tp
        bias, qkv_bias = cfg.add_bias_linear, cfg.add_bias_linear or cfg.add_qkv_bias
        self.topo = topo
        self.wq = ColumnParallelLinear(cfg.hidden_size, cfg.num_attention_heads * hd, topo, qkv_bias,
                                       input_entered=True)
        self.wk = ColumnParallelLinear(cfg.hidden_size, cfg.num_query_groups * hd, topo, qkv_bias, input_entered=True)
        self.wv = ColumnParallelLinear(cfg.hidden_size, cfg.num_query_groups * hd, topo, qkv_bias, input_entered=True)
        self.wo = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, topo, bias)
        self.sinks = None
        if cfg.softmax_type == "learnable":  # one logit per head, split over TP with the heads
            self.sinks = nn.Parameter(torch.zeros(self.n_heads))
            self.sinks.tp_dim = 0
        if cfg.qk_layernorm:  # shared by every head; each TP rank normalises its own heads: gradients summed over TP
            self.q_norm = Norm(hd, cfg.normalization, cfg.norm_epsilon, topo.tp > 1)
            self.k_norm = Norm(hd, cfg.normalization, cfg.norm_epsilon, topo.tp > 1)

    def forward(self, x, rope=None, kv_cache: Optional[KVCache] = None, doc_mask=None):
        """``doc_mask``: boolean ``[b, 1, s, s]`` allowed query-key pairs (packed documents), else causal."""
        hd = self.cfg.head_dim
        x = enter_tp_region(x, self.topo)  # the whole sequence, also when x was a sequence-parallel shard
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        b, s = q.shape[:2]
        q, k = q.view(b, s, self.n_heads, hd), k.view(b, s, self.n_kv, hd)
        if self.cfg.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, s, self.n_kv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        past, mask = 0, doc_mask
        if kv_cache is not None:
            past, mask = kv_cache.length, kv_cache.mask(s, x.device)
            k, v = kv_cache.update(self.layer, k, v)
        if self.topo.cp > 1 and kv_cache is None:  # the sequence is split: attention across the CP ranks
            kind = self.topo.cp_comm_type(int(self.layer))
            heads = None  # a2a hands this rank its CP share of the heads, whose sinks it needs
            if kind == "a2a":
                per = self.n_heads // self.topo.cp
                heads = slice(self.topo.cp_rank * per, (self.topo.cp_rank + 1) * per)
            out = context_attention(kind, q, k, v, self.topo, mask[kind],
                                    lambda q, k, v, m: self._attend(q, k, v, 0, m, heads))
        elif self.cfg.recompute_granularity == "selective" and self.training and kv_cache is None:
            out = recomputed(self._attend, self.rng, q, k, v, 0, mask)
        else:
            out = self._attend(q, k, v, past, mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, self.n_heads * hd))

    def _attend(self, q, k, v, past: int = 0, mask=None, heads: Optional[slice] = None):
        """The attention core (scores, softmax, dropout, weighted values): what selective recomputation redoes."""
        dropout = self.cfg.attention_dropout if self.training else 0.0
        with self.rng.fork() if dropout > 0 else contextlib.nullcontext():
            return self._attend_with(q, k, v, past, dropout, mask, heads)

    def _attend_with(self, q, k, v, past: int, dropout: float, mask=None, heads: Optional[slice] = None):
        """``heads``: which of this rank's heads ``q`` holds (context parallelism's all-to-all splits them)."""
        s = q.shape[2]
        if self.window is not None:  # query i (at past + i) sees keys j with i - window < j <= i
            mask = _window(s, k.shape[2], past, self.window, q.device) & \
                (mask if mask is not None else True)
        if self.cfg.softmax_type != "vanilla":
            rep = q.shape[1] // k.shape[1]
            k, v = (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)
            if mask is None:
                mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=past)
            sink = self.sinks[heads or slice(None)] if self.sinks is not None else q.new_zeros(q.shape[1])
            return sink_attention(q, k, v, sink, mask, dropout, self.training)
        if mask is not None:  # packed documents, a padded batch or a window: an explicit mask
            rep = self.n_heads // self.n_kv
            k, v = (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        if self.cfg.attention_backend == "sdpa":
            if past == 0:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     enable_gqa=self.n_kv != self.n_heads)
            else:  # decoding: the new queries see every cached position up to their own
                mask = torch.ones(s, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=past)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                     enable_gqa=self.n_kv != self.n_heads)
            return out
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.cfg.attention_backend == "fused" and past == 0:
            probs = fused_softmax(torch.matmul(q, k.transpose(-1, -2)), 1.0 / math.sqrt(q.shape[-1]), causal=True)
            return torch.matmul(F.dropout(probs, dropout, self.training), v)
        return unfused_attention(q, k, v, past, dropout, self.training)


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
        x = enter_tp_region(x, self.topo)
        if self.swiglu:
            return self.w2(gated(self.cfg, self.w1(x), self.w3(x)))
        return self.w2(F.gelu(self.w1(x), approximate=self.approximate))


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
        self.attention = Attention(cfg, topo, layer, rng)
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
