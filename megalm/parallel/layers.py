"""Tensor-parallel layers. At TP = 1 each is exactly the plain torch layer it replaces.

Every parameter carries ``tp_dim``: the dimension it is split along across the TP group (None when replicated).
Under sequence parallelism a column-parallel layer all-gathers its sequence-sharded input and a row-parallel one
reduce-scatters its output back to sequence shards; replicated parameters that then see only this rank's shard
(norms, row-parallel biases) are marked ``sequence_parallel`` so their gradients are summed over the TP group.
``init_shard_`` fills a shard from the full tensor drawn with a per-parameter generator, so the same seed gives
the same full model whatever the layout.
"""
from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megalm.parallel.fp8 import linear
from megalm.parallel.lora import active
from megalm.parallel.mappings import (copy_to_tp, gather_from_sequence_parallel, reduce_from_tp,
                                      reduce_scatter_to_sequence_parallel)
from megalm.parallel.state import Topology


def _param(shape, tp_dim: Optional[int], sequence_parallel: bool = False) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    p.tp_dim = tp_dim
    p.sequence_parallel = sequence_parallel
    return p


def sum_sequence_parallel_grads_in_backward(model: nn.Module, topo: Topology) -> None:
    """For an optimizer that does not read the ``sequence_parallel`` mark (DeepSpeed's engine): each backward's
    gradient of such a parameter is summed over the TP group before it is accumulated, so every optimizer sees
    whole gradients. (megalm's own optimizer sums once per step instead, in its gradient buckets.)"""
    def summed(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=topo.tp_group)
        return grad

    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and topo.tp > 1:
            p.register_hook(summed)


def enter_tp_region(x, topo: Topology):
    """The input of a column-parallel computation: replicated (copy) or, under SP, gathered from shards."""
    if topo.sequence_parallel:
        return gather_from_sequence_parallel(x, topo.tp_group)
    return copy_to_tp(x, topo.tp_group)


def leave_tp_region(x, topo: Topology):
    """Sum partial results over TP: all-reduce, or under SP reduce-scatter to sequence shards."""
    if topo.sequence_parallel:
        return reduce_scatter_to_sequence_parallel(x, topo.tp_group)
    return reduce_from_tp(x, topo.tp_group)


class ColumnParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split by output rows: each rank produces its slice of the outputs.

    ``input_entered``: the caller already passed ``x`` through ``enter_tp_region`` (several projections of one
    input share that collective, and its backward sums their gradients once).
    """
    fp8_split = "out"  # what TP splits, for FP8's scales: the outputs
    split = "out"  # what TP splits, for a LoRA adapter beside it

    def __init__(self, in_features: int, out_features: int, topo: Topology, bias: bool = True,
                 input_entered: bool = False):
        super().__init__()
        self.topo, self.input_entered = topo, input_entered
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features // topo.tp, in_features), 0)
        self.bias = _param((out_features // topo.tp,), 0) if bias else None
        self.fp8 = None  # an ``fp8.FP8Spec`` under --fp8-format
        self.lora = None  # a ``lora.LoRA`` under --lora-rank

    def forward(self, x):
        return self.entered(x if self.input_entered else enter_tp_region(x, self.topo))

    def entered(self, x):
        """The layer on an input already in the TP region."""
        y = linear(x, self.weight, self.bias, self.fp8)
        return y + self.lora(x) if active(self.lora) else y


def column_parallel(x, layers, topo: Topology) -> list:
    """Several column-parallel layers applied to one input, which enters the TP region once: their outputs.
    Without sequence parallelism (and FP8 and adapters) one autograd function does it all, so that backward starts
    the all-reduce of the input's gradient as soon as that gradient is computed and computes the weights'
    gradients while it runs (Megatron's overlap of the TP all-reduce with the weight-gradient GEMM)."""
    if topo.tp == 1 or topo.sequence_parallel or any(layer.fp8 is not None or active(layer.lora)
                                                     for layer in layers):
        x = enter_tp_region(x, topo)
        return [layer.entered(x) for layer in layers]
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    return list(_SharedInputLinears.apply(x, topo.tp_group, *params))


class _SharedInputLinears(torch.autograd.Function):
    """``x W_i^T + b_i`` for each (weight, bias) pair; backward sums the input's gradient over the TP group
    asynchronously while the weights' gradients are computed."""

    @staticmethod
    def forward(ctx, x, group, *params):
        ctx.group, ctx.biased = group, [b is not None for b in params[1::2]]
        weights = params[0::2]
        ctx.save_for_backward(x, *weights)
        return tuple(F.linear(x, w, b) for w, b in zip(weights, params[1::2]))

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        width = x.shape[-1]
        grads = [g.reshape(-1, g.shape[-1]) for g in grads]
        grad_x = grads[0] @ weights[0]
        for g, w in zip(grads[1:], weights[1:]):
            grad_x.addmm_(g, w)
        compiling = torch.compiler.is_compiling()  # dynamo traces no async collective: the compiler orders it
        work = dist.all_reduce(grad_x, group=ctx.group, async_op=not compiling)
        flat = x.reshape(-1, width)
        out = []
        for g, biased in zip(grads, ctx.biased):
            out += [g.t() @ flat, g.sum(0) if biased else None]
        if not compiling:
            work.wait()
        return (grad_x.view(x.shape), None, *out)


class RowParallelLinear(nn.Module):
    """``y = x A^T + b`` with A split by input columns: partial products are summed over the TP group."""
    fp8_split = "in"  # what TP splits, for FP8's scales: the contraction
    split = "in"  # what TP splits, for a LoRA adapter beside it

    def __init__(self, in_features: int, out_features: int, topo: Topology, bias: bool = True):
        super().__init__()
        self.topo = topo
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features // topo.tp), 1)
        self.bias = _param((out_features,), None, topo.sequence_parallel) if bias else None
        self.fp8 = None  # an ``fp8.FP8Spec`` under --fp8-format
        self.lora = None  # a ``lora.LoRA`` under --lora-rank: its partial product joins the layer's reduction

    def forward(self, x):
        y = linear(x, self.weight, None, self.fp8)
        if active(self.lora):
            y = y + self.lora(x)
        y = leave_tp_region(y, self.topo)
        return y + self.bias if self.bias is not None else y


class ReplicatedLinear(nn.Module):
    """``y = x A^T``, A whole on every TP rank, applied to the input as it comes (under SP this rank's sequence
    shard, its weight's gradient then summed over TP): a projection small enough to repeat, whose output the
    caller passes through ``enter_tp_region`` (multi-latent attention's down-projections, Megatron's way)."""

    split = None  # nothing: a LoRA adapter beside it is whole too

    def __init__(self, in_features: int, out_features: int, topo: Topology):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), None, topo.sequence_parallel)
        self.lora = None  # a ``lora.LoRA`` under --lora-rank

    def forward(self, x):
        y = F.linear(x, self.weight)
        return y + self.lora(x) if active(self.lora) else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; ids outside this rank's range contribute zeros."""

    def __init__(self, num_embeddings: int, dim: int, topo: Topology):
        super().__init__()
        self.topo = topo
        self.per_rank = num_embeddings // topo.tp
        self.vocab_start = topo.tp_rank * self.per_rank
        self.weight = _param((self.per_rank, dim), 0)

    def forward(self, ids):
        if self.topo.tp == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.topo.tp_group)


def param_generator(seed: int, name: str, device: Optional[torch.device] = None) -> torch.Generator:
    """A generator on ``device`` that depends only on the seed and the parameter's global name."""
    return torch.Generator(device=device or "cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


@torch.no_grad()
def init_shard_(param: torch.Tensor, full_shape, std: float, generator: torch.Generator, topo: Topology,
                valid_rows: Optional[int] = None, bound: Optional[float] = None) -> None:
    """Draw the full tensor ``normal(0, std)`` (or with ``bound`` uniform in ``[-bound, bound]``) and copy this
    rank's shard into ``param``.

    ``valid_rows`` draws only the first rows (the real vocabulary) and zeroes the rest (padding), so the padded
    size, which depends on TP, does not change the values.
    """
    full = torch.zeros(full_shape, device=param.device)  # fp32 whatever the parameter's dtype
    rows = full_shape[0] if valid_rows is None else valid_rows
    if bound is None:
        full[:rows].normal_(0.0, std, generator=generator)
    else:
        full[:rows].uniform_(-bound, bound, generator=generator)
    param.copy_(shard_of(full, param, topo))


def shard_of(full: torch.Tensor, param: torch.Tensor, topo: Topology) -> torch.Tensor:
    """This rank's part of a whole tensor: split along ``tp_dim`` over TP, or for an expert parameter along
    dim 0 (the experts) over the expert-parallel ranks and along ``etp_dim`` (the width) over ETP."""
    if getattr(param, "expert", False):
        part = full if topo.ep == 1 else full.chunk(topo.ep, dim=0)[topo.ep_rank]
        return part if topo.etp == 1 or param.etp_dim is None else part.chunk(topo.etp, dim=param.etp_dim)[
            topo.etp_rank]
    dim = getattr(param, "tp_dim", None)
    return full if dim is None or topo.tp == 1 else full.chunk(topo.tp, dim=dim)[topo.tp_rank]


def full_shape(param: torch.Tensor, topo: Topology):
    shape = list(param.shape)
    if getattr(param, "expert", False):
        shape[0] *= topo.ep
        if param.etp_dim is not None:
            shape[param.etp_dim] *= topo.etp
        return tuple(shape)
    dim = getattr(param, "tp_dim", None)
    if dim is not None:
        shape[dim] *= topo.tp
    return tuple(shape)
