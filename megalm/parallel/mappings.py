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


def _all_reduce_in_place(x, group):
    """For a forward whose input is a fresh product nothing else holds (a row-parallel matmul's partial sums):
    no copy (autograd would refuse the change if anything had saved it)."""
    if _size(group) == 1:
        return x
    x = x.contiguous()
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


def _identity(x, group):
    return x


class _Conjugate(torch.autograd.Function):
    """Forward ``fwd``, backward ``bwd``: each public mapping below is such a pair."""

    @staticmethod
    def forward(ctx, x, group, fwd, bwd):
        ctx.group, ctx.bwd = group, bwd
        return fwd(x, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.bwd(grad, ctx.group), None, None, None


def _pair(x, group, fwd, bwd):
    return x if _size(group) == 1 else _Conjugate.apply(x, group, fwd, bwd)


def copy_to_tp(x, group):
    """Identity forward, all-reduce of the gradient: enters a column-parallel region."""
    return _pair(x, group, _identity, _all_reduce)


def reduce_from_tp(x, group):
    """All-reduce forward (in place: the row-parallel partial sums), identity backward: leaves a row-parallel
    region."""
    return _pair(x, group, _all_reduce_in_place, _identity)


def gather_from_tp(x, group):
    """Concatenate every rank's slice of the last dimension; the backward splits."""
    return _pair(x, group, _gather_last, _split_last)


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


def gather_from_sequence_parallel(x, group):
    """All-gather the sequence shards forward; reduce-scatter the gradient (enters a TP region under SP)."""
    return _pair(x, group, _all_gather_seq, _reduce_scatter_seq)


def reduce_scatter_to_sequence_parallel(x, group):
    """Sum partial results and keep this rank's sequence shard; all-gather the gradient (leaves a TP region)."""
    return _pair(x, group, _reduce_scatter_seq, _all_gather_seq)


def scatter_to_sequence_parallel(x, group):
    """Keep this rank's sequence shard of a replicated tensor; all-gather the gradient."""
    return _pair(x, group, _split_seq, _all_gather_seq)


# Along dim 0 (the token dimension of expert dispatch, ``megalm/parallel/experts.py``), equal parts per rank.

def _gather_dim0(x, group):
    out = x.new_empty((_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_dim0(x, group):
    out = x.new_empty((x.shape[0] // _size(group),) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


def gather_values_dim0(x, group):
    """Every rank's part stacked along dim 0, outside autograd (indices, detached scores)."""
    return _gather_dim0(x, group)


def gather_dim0(x, group):
    """Every rank's part stacked along dim 0; the backward reduce-scatters (sums) the gradient."""
    return _pair(x, group, _gather_dim0, _reduce_scatter_dim0)


def reduce_scatter_dim0(x, group):
    """Sum over the group and keep this rank's part of dim 0; the backward all-gathers."""
    return _pair(x, group, _reduce_scatter_dim0, _gather_dim0)
