"""Gradient synchronisation after backward: sequence-parallel partial sums over TP, the tied embedding's two
halves summed over the first and last pipeline stage, then the average over DP."""
from __future__ import annotations

import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megalm.parallel.state import Topology


def _all_reduce_flat(grads, group, scale: float = 1.0) -> None:
    """One all-reduce per dtype over flattened copies, written back into ``grads``."""
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for same in by_dtype.values():
        flat = _flatten_dense_tensors(same)
        if scale != 1.0:
            flat.mul_(scale)
        dist.all_reduce(flat, group=group)
        for g, reduced in zip(same, _unflatten_dense_tensors(flat, same)):
            g.copy_(reduced)


def sync_gradients(params, topo: Topology) -> None:
    params = [p for p in params if p.grad is not None]
    if topo.sequence_parallel:
        _all_reduce_flat([p.grad for p in params if getattr(p, "sequence_parallel", False)], topo.tp_group)
    shared = [p.grad for p in params if getattr(p, "shared_embedding", False)]
    if shared:
        _all_reduce_flat(shared, topo.embedding_group)
    if topo.dp > 1:
        _all_reduce_flat([p.grad for p in params], topo.dp_group, 1.0 / topo.dp)
