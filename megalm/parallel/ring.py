"""Ring attention (``--cp-comm-type p2p``): keys and values travel round the context-parallel ranks.

Rank ``r`` holds chunks ``r`` and ``2 CP - 1 - r`` of the sequence (``megalm.parallel.context``). At step ``j`` it
holds the keys and values of rank ``src = r - j`` (mod CP) and, while it computes with them, already sends them on
to rank ``r + 1`` and receives rank ``src - 1``'s from rank ``r - 1`` (``batch_isend_irecv``). Which queries see
which keys follows from the chunk order, so every step costs every rank the same:

- ``j = 0``: all local queries against all local keys, causal (the local order is the sequence order);
- ``src < r``: all local queries against chunk ``src`` only (chunk ``2 CP - 1 - src`` lies after both of mine);
- ``src > r``: only my late chunk's queries, against both of ``src``'s chunks (both lie between mine).

Each block returns its output and log-sum-exp (``megalm.kernels.attention_lse``); blocks merge in fp32. Backward
walks the ring again: each block's gradients come from the final output and log-sum-exp; the key/value gradients
(fp32) travel with their block and arrive home after ``CP`` hops. Saved for backward: q, k, v, the output and the
log-sum-exp, all of this rank's size; no s x s matrix anywhere.

With packed documents every rank's document ids (``[CP, b, 2 s / 2 CP]``, gathered once per forward) give each
block its mask. Attention dropout has no place in blockwise attention: the configuration refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megalm.kernels.attention_lse import attention_lse, attention_lse_backward


@dataclass
class RingDocuments:
    """Document ids of this rank's tokens ``[b, s_local]`` and of every CP rank's, ``[CP, b, s_local]``."""
    local: torch.Tensor
    per_rank: torch.Tensor


class Ring:
    """This rank's neighbours in a group and one exchange: send to the next rank, receive from the previous."""

    def __init__(self, group):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, send: torch.Tensor):
        """Post the exchange; returns (the receive buffer, the requests to wait on)."""
        recv = torch.empty_like(send)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send, self.next, self.group),
                                       dist.P2POp(dist.irecv, recv, self.prev, self.group)])
        return recv, reqs


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


def _block(step: int, src: int, rank: int, chunk: int):
    """(query rows, key columns, causal) of step ``step``, holding rank ``src``'s keys and values."""
    everything = slice(0, 2 * chunk)
    if step == 0:
        return everything, everything, True
    if src < rank:
        return everything, slice(0, chunk), False
    return slice(chunk, 2 * chunk), everything, False


def _bias(docs: Optional[RingDocuments], src: int, rows, cols, causal: bool, dtype):
    """The block's additive mask under packed documents (causality folded in), else None."""
    if docs is None:
        return None, causal
    allowed = docs.local[:, rows, None] == docs.per_rank[src][:, None, cols]
    if causal:
        allowed = allowed & torch.ones(allowed.shape[1:], dtype=torch.bool, device=allowed.device).tril()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return bias[:, None], False


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, scale: float, docs: Optional[RingDocuments], sink: Optional[torch.Tensor]):
        chunk, dk = q.shape[2] // 2, k.shape[-1]
        kv = torch.cat((k, v), dim=-1)  # one message per step (values may be narrower than keys: MLA)
        out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        for step in range(ring.size):
            if step < ring.size - 1:
                incoming, reqs = ring.start(kv)
            src = (ring.rank - step) % ring.size
            rows, cols, causal = _block(step, src, ring.rank, chunk)
            bias, causal = _bias(docs, src, rows, cols, causal, q.dtype)
            o, l = attention_lse(q[:, :, rows], kv[:, :, cols, :dk], kv[:, :, cols, dk:], causal, scale, bias)
            merged = torch.logaddexp(lse[:, :, rows], l)
            out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[:, :, rows] - merged)[..., None]
                               + o.float() * torch.exp(l - merged)[..., None])
            lse[:, :, rows] = merged
            if step < ring.size - 1:
                _wait(reqs)
                kv = incoming
        if sink is not None:  # once, into the whole row's denominator: a logit that no key owns
            merged = torch.logaddexp(lse, sink.float().view(1, -1, 1))
            out, lse = out * torch.exp(lse - merged)[..., None], merged
        out = out.to(q.dtype)
        ctx.ring, ctx.scale, ctx.docs, ctx.sink = ring, scale, docs, sink is not None
        ctx.save_for_backward(q, k, v, out, lse, *(() if sink is None else (sink,)))
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *sink = ctx.saved_tensors
        ring, chunk, dk = ctx.ring, q.shape[2] // 2, k.shape[-1]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, dkv_in, dkv_reqs = torch.cat((k, v), dim=-1), None, None
        for step in range(ring.size):
            if step < ring.size - 1:
                incoming, kv_reqs = ring.start(kv)
            src = (ring.rank - step) % ring.size
            rows, cols, causal = _block(step, src, ring.rank, chunk)
            bias, causal = _bias(ctx.docs, src, rows, cols, causal, q.dtype)
            gq, gk, gv = attention_lse_backward(dout[:, :, rows], q[:, :, rows], kv[:, :, cols, :dk],
                                                kv[:, :, cols, dk:], out[:, :, rows], lse[:, :, rows], causal,
                                                ctx.scale, bias)
            dq[:, :, rows] += gq
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
            dkv[:, :, cols, :dk], dkv[:, :, cols, dk:] = gk, gv
            if dkv_reqs is not None:  # what the ranks before me added to this block's gradients
                _wait(dkv_reqs)
                dkv += dkv_in
            dkv_in, dkv_reqs = ring.start(dkv)
            if step < ring.size - 1:
                _wait(kv_reqs)
                kv = incoming
        _wait(dkv_reqs)  # after CP hops my own block's gradients are home
        dsink = None
        if sink:  # d out / d sink = -p_sink out: the sink's share of each row times that row's sum(dout * out)
            share = torch.exp(sink[0].float().view(1, -1, 1) - lse)
            dsink = -(share * (dout.float() * out.float()).sum(-1)).sum((0, 2)).to(sink[0].dtype)
        return dq.to(q.dtype), dkv_in[..., :dk].to(k.dtype), dkv_in[..., dk:].to(v.dtype), None, None, None, dsink


def ring_attention(q, k, v, group, scale: float, docs: Optional[RingDocuments] = None,
                   sink: Optional[torch.Tensor] = None):
    """Causal attention of this rank's queries over the whole sequence (see the module's docstring); ``sink``: one
    logit per head in every row's softmax (GPT-OSS's), merged into the log-sum-exp once, after the ring."""
    return _RingAttention.apply(q, k, v, Ring(group), scale, docs, sink)
