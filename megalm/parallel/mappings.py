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
    out = torch.empty((n,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x, group=group)
    return torch.cat(out.unbind(0), dim=-1)


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
