"""AdamW with decoupled weight decay on weight matrices only, not on biases and norm weights (every 1-D
parameter, and what is marked ``no_decay``: the experts' stacked biases). ``DistributedOptimizer`` applies it to
its slices; the DeepSpeed path hands it the whole model."""
from __future__ import annotations

import torch

from megalm.config import OptimConfig


def decays(p: torch.Tensor) -> bool:
    return p.ndim >= 2 and not getattr(p, "no_decay", False)  # the experts' biases are [experts, width]


def adamw(decay: list, no_decay: list, cfg: OptimConfig, on_gpu: bool) -> torch.optim.Optimizer:
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             fused=on_gpu or None, foreach=None if on_gpu else True)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return adamw([p for p in params if decays(p)], [p for p in params if not decays(p)], cfg, params[0].is_cuda)
