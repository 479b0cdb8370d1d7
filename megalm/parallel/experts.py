"""Token dispatch for expert parallelism: getting each (token, expert) pair to the rank that holds the expert and
the result back, as autograd functions (what ``mappings.py`` is for tensor parallelism).

A dispatcher takes this rank's tokens ``x [T, h]``, their experts ``experts [T, k]`` (global ids; ``E``, one past
the last, marks a pair dropped by the capacity rule, which goes nowhere) and weights ``probs [T, k]``, runs ``compute(tokens, counts)`` on the tokens that reach this rank, sorted by local expert with
``counts`` per local expert, and returns ``sum_k probs * expert_k(x)`` for this rank's tokens.

- ``local``: one rank holds every expert (EP 1).
- ``alltoall``: tokens sorted by expert go to the experts' ranks with one uneven all-to-all, come back with another;
  the pairs whose expert is on this rank stay out of the collective.
- ``allgather``: every rank gathers all tokens of the EP group, computes its own experts' share, and the partial
  sums are reduce-scattered back.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.distributed as dist

from megalm.parallel.mappings import gather_dim0, reduce_scatter_dim0

Compute = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _AllToAll(torch.autograd.Function):
    """Uneven ``all_to_all_single`` along dim 0; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits: List[int], in_splits: List[int], group):
        ctx.splits, ctx.group = (in_splits, out_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back_out, back_in = ctx.splits
        out = grad.new_empty((sum(back_out),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), back_out, back_in, group=ctx.group)
        return out, None, None, None


def _sort_by_expert(experts: torch.Tensor, num_experts: int):
    """(order, token of each sorted pair, pairs per expert): the (token, choice) pairs flattened and sorted by
    expert, stably, so that within an expert tokens keep their order; dropped pairs (id ``num_experts``) sort
    last and are left out."""
    flat = experts.reshape(-1)
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    order = torch.argsort(flat, stable=True)[: int(counts.sum())]
    return order, order // experts.shape[1], counts


def _combine(y: torch.Tensor, order, token, probs, num_tokens: int) -> torch.Tensor:
    """``sum_k probs * y`` back at each token's row (``y`` in sorted order)."""
    weighted = y * probs.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return weighted.new_zeros((num_tokens, y.shape[1])).index_add_(0, token, weighted)


def dispatch_local(x, experts, probs, num_experts: int, compute: Compute) -> torch.Tensor:
    order, token, counts = _sort_by_expert(experts, num_experts)
    return _combine(compute(x[token], counts), order, token, probs, x.shape[0])


def _segments(counts: torch.Tensor) -> torch.Tensor:
    """For a [ranks, local experts] count matrix laid out rank-major, the permutation to expert-major."""
    ranks, local = counts.shape
    flat = counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat
    by_expert = torch.arange(ranks * local, device=counts.device).view(ranks, local).t().reshape(-1)
    lengths = flat[by_expert]
    first = torch.repeat_interleave(starts[by_expert], lengths)
    within = torch.arange(int(lengths.sum()), device=counts.device) - torch.repeat_interleave(
        torch.cumsum(lengths, 0) - lengths, lengths)
    return first + within


def _exchange(x, out_splits: List[int], in_splits: List[int], me: int, group):
    """Rank-major chunks ``in_splits`` of ``x`` to every rank, ``out_splits`` back from each, in rank order. The
    chunk for this rank itself never enters the collective (it stays in place), so only what must cross ranks is
    handed to ``torch.distributed``, forward and backward."""
    own_start = sum(in_splits[:me])
    own = x[own_start: own_start + in_splits[me]]
    send = torch.cat((x[:own_start], x[own_start + in_splits[me]:]))
    remote_in, remote_out = list(in_splits), list(out_splits)
    remote_in[me] = remote_out[me] = 0
    got = _AllToAll.apply(send, remote_out, remote_in, group)
    before = sum(out_splits[:me])
    return torch.cat((got[:before], own, got[before:]))


def dispatch_alltoall(x, experts, probs, num_experts: int, compute: Compute, group) -> torch.Tensor:
    ep, me = dist.get_world_size(group), dist.get_rank(group)
    local = num_experts // ep
    order, token, counts = _sort_by_expert(experts, num_experts)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # [source rank, my local expert]
    received = received.view(ep, local)
    send = counts.view(ep, local).sum(1).tolist()
    recv = received.sum(1).tolist()
    tokens = _exchange(x[token], recv, send, me, group)
    perm = _segments(received)
    out = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))
    y = compute(tokens[perm], received.sum(0))[out]  # expert-major for the experts, back to rank-major
    y = _exchange(y, send, recv, me, group)
    return _combine(y, order, token, probs, x.shape[0])


def dispatch_allgather(x, experts, probs, num_experts: int, compute: Compute, group, ep_rank: int) -> torch.Tensor:
    ep = dist.get_world_size(group)
    local = num_experts // ep
    x_all = gather_dim0(x, group)
    experts_all = gather_dim0(experts, group)
    probs_all = gather_dim0(probs, group)
    mine = (experts_all >= ep_rank * local) & (experts_all < (ep_rank + 1) * local)
    pairs = mine.reshape(-1).nonzero().squeeze(1)
    ids = experts_all.reshape(-1)[pairs] - ep_rank * local
    order = torch.argsort(ids, stable=True)
    pairs = pairs[order]
    token = pairs // experts.shape[1]
    counts = torch.bincount(ids, minlength=local)
    y = compute(x_all[token], counts)
    weighted = y * probs_all.reshape(-1)[pairs].unsqueeze(1).to(y.dtype)
    partial = weighted.new_zeros((x_all.shape[0], y.shape[1])).index_add_(0, token, weighted)
    return reduce_scatter_dim0(partial, group)
