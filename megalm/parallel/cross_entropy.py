"""Cross-entropy over vocabulary-parallel logits, without ever gathering the full logits.

Padded vocabulary entries (ids at or above the real vocabulary size) are masked out, so the loss does not depend
on how much padding the TP size needed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _reduce(x, op, group):
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        ctx.dtype = logits.dtype
        logits = logits.float()
        width = logits.shape[-1]
        pad_from = vocab_size - vocab_start
        if pad_from < width:
            logits = logits.clone()
            logits[..., max(pad_from, 0):] = float("-inf")
        logits_max = _reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX, group)
        shifted = logits - logits_max.unsqueeze(-1)
        local = target - vocab_start
        inside = (local >= 0) & (local < width)
        local = local.masked_fill(~inside, 0)
        predicted = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0)
        predicted = _reduce(predicted, dist.ReduceOp.SUM, group)
        exp = shifted.exp_()
        sum_exp = _reduce(exp.sum(dim=-1), dist.ReduceOp.SUM, group)
        loss = sum_exp.log() - predicted
        exp.div_(sum_exp.unsqueeze(-1))  # now the softmax, kept for backward
        ctx.save_for_backward(exp, local, inside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, inside = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local.unsqueeze(-1), -inside.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int,
                                 group=None) -> torch.Tensor:
    """Per-token loss ``[...]`` from this rank's logits slice ``[..., V/TP]`` (columns from ``vocab_start``)."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, group)
