"""Autograd-aware collectives over the tensor-parallel group (Megatron's ``mappings.py``).

Each pair is conjugate: what the forward does, the backward undoes. With a group of one they are identities.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x, group):
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x, group):
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=-1)[dist.get_rank(group)].contiguous()


def _gather_last(x, group):
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return torch.cat(out.chunk(n, dim=0), dim=-1)


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp(x, group):
    """Identity forward, all-reduce of the gradient: enters a column-parallel region."""
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp(x, group):
    """All-reduce forward, identity backward: leaves a row-parallel region."""
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tp(x, group):
    """Keep this rank's slice of the last dimension; the backward gathers."""
    return x if _size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_tp(x, group):
    """Concatenate every rank's slice of the last dimension; the backward splits."""
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group)


# Sequence parallelism: activations between blocks are split along the sequence (dim 1 of [b, s, h]).
# The collectives work on dim 0, so the sequence is moved there and back.

def _all_gather_seq(x, group):
    n = _size(group)
    if n == 1:
        return x
    xs = x.transpose(0, 1).contiguous()
    out = torch.empty((n * xs.shape[0],) + tuple(xs.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, xs, group=group)
    return out.transpose(0, 1)


def _reduce_scatter_seq(x, group):
    n = _size(group)
    if n == 1:
        return x
    xs = x.transpose(0, 1).contiguous()
    out = torch.empty((xs.shape[0] // n,) + tuple(xs.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, xs, group=group)
    return out.transpose(0, 1)


def _split_seq(x, group):
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=1)[dist.get_rank(group)].contiguous()


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_seq(grad, ctx.group), None


def gather_from_sequence_parallel(x, group):
    """All-gather the sequence shards forward; reduce-scatter the gradient (enters a TP region under SP)."""
    return x if _size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence_parallel(x, group):
    """Sum partial results and keep this rank's sequence shard; all-gather the gradient (leaves a TP region)."""
    return x if _size(group) == 1 else _ReduceScatterToSequence.apply(x, group)


def scatter_to_sequence_parallel(x, group):
    """Keep this rank's sequence shard of a replicated tensor; all-gather the gradient."""
    return x if _size(group) == 1 else _ScatterToSequence.apply(x, group)
