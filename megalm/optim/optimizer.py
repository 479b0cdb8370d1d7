"""AdamW with decoupled weight decay on matrices only, and clipping by the true global gradient norm."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from megalm.config import OptimConfig
from megalm.parallel.state import Topology


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on weight matrices; none on biases and norm weights (every 1-D parameter)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    on_gpu = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=on_gpu or None, foreach=None if on_gpu else True)


def global_grad_norm(params: Iterable[torch.nn.Parameter], topo: Topology) -> torch.Tensor:
    """L2 norm of the whole model's gradient: shards split across TP are summed over the TP group,
    parameters replicated across TP are counted once, stages summed over the pipeline (the last stage's copy of a
    tied embedding left out)."""
    sharded, replicated = [], []
    for p in params:
        if p.grad is not None and not getattr(p, "tied_copy", False):
            (sharded if getattr(p, "tp_dim", None) is not None else replicated).append(p.grad)
    grads = sharded + replicated
    zero = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    sq_sharded = sum((g.float().pow(2).sum() for g in sharded), zero)
    sq_replicated = sum((g.float().pow(2).sum() for g in replicated), zero)
    if topo.tp > 1:
        dist.all_reduce(sq_sharded, group=topo.tp_group)
    total = sq_sharded + sq_replicated
    if topo.pp > 1:
        dist.all_reduce(total, group=topo.pp_group)
    return total.sqrt()


def clip_grads_(params, max_norm: float, topo: Topology) -> float:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    params = list(params)
    norm = global_grad_norm(params, topo)
    total = float(norm)
    if max_norm > 0 and math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-6)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
    return total
