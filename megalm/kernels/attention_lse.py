"""Attention that also returns its log-sum-exp, and the backward that takes it.

Ring attention (``megalm.parallel.ring``) computes attention one key/value block at a time and merges the partial
results with their log-sum-exps, never holding an s x s matrix. Public SDPA does not return the log-sum-exp; on
CPU PyTorch's flash kernel does (``_scaled_dot_product_flash_attention_for_cpu``) and has a backward that takes
the final output and log-sum-exp, so each block's gradients come out exact. Elsewhere a plain version computes
one block's fp32 scores at a time (a block is at most ``s / CP`` x ``s / CP``); also on CPU when values are
narrower than keys (multi-latent attention), which the flash kernel refuses.

Shapes: ``q`` ``[b, heads, sq, d]``; ``k``, ``v`` ``[b, groups, sk, d]`` (grouped-query: repeated to the query
heads here, their gradients summed back); ``causal`` lets query i see keys up to i (top-left aligned);
``bias`` an additive ``[b, 1, sq, sk]`` mask in the query's dtype (``-inf``: not allowed). A query row with no
allowed key gets output 0 and log-sum-exp ``-inf``, so merging it adds nothing.
"""
from __future__ import annotations

from typing import Optional

import torch


def repeat_groups(k, v, heads: int):
    """Keys and values of grouped-query attention repeated to ``heads`` heads (as they are when already)."""
    rep = heads // k.shape[1]
    return (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)) if rep > 1 else (k, v)


def _fold(grad, groups: int):
    """Sum a gradient over the query heads that shared each key/value group."""
    b, heads, s, d = grad.shape
    return grad.view(b, groups, heads // groups, s, d).sum(2) if heads != groups else grad


def _scores(q, k, causal: bool, scale: float, bias):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s if bias is None else s + bias.float()


def _flash(q, v) -> bool:
    """Whether PyTorch's CPU flash kernel applies: on CPU, values as wide as queries (MLA's are not)."""
    return q.device.type == "cpu" and v.shape[-1] == q.shape[-1]


def attention_lse(q, k, v, causal: bool, scale: float, bias: Optional[torch.Tensor] = None):
    """``(out, lse)``: out in q's dtype, lse ``[b, heads, sq]`` in fp32."""
    k, v = repeat_groups(k, v, q.shape[1])
    if _flash(q, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                              scale=scale)
    else:
        s = _scores(q, k, causal, scale, bias)
        lse = torch.logsumexp(s, -1)
        out = torch.matmul(torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None]), v.float()).to(q.dtype)
    if bias is not None:  # rows with no allowed key: the kernel leaves lse 0; make them count for nothing
        empty = torch.isinf(bias).all(-1).expand(lse.shape)
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty[..., None], 0.0)
    return out, lse.float()


def attention_lse_backward(dout, q, k, v, out, lse, causal: bool, scale: float, bias=None):
    """Gradients of one block given the *final* (merged) ``out`` and ``lse`` of these queries: with those the
    block's probabilities are exactly its share of the full softmax."""
    groups = k.shape[1]
    kr, vr = repeat_groups(k, v, q.shape[1])
    if _flash(q, v):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, kr, vr, out.contiguous(), lse.contiguous(), 0.0, causal, attn_mask=bias,
            scale=scale)
    else:
        p = torch.exp(_scores(q, kr, causal, scale, bias) - lse[..., None])
        dout32 = dout.float()
        dv = torch.matmul(p.transpose(-1, -2), dout32)
        dp = torch.matmul(dout32, vr.float().transpose(-1, -2))
        ds = p * (dp - (dout32 * out.float()).sum(-1, keepdim=True)) * scale
        dq, dk = torch.matmul(ds, kr.float()), torch.matmul(ds.transpose(-1, -2), q.float())
    return dq, _fold(dk, groups), _fold(dv, groups)
