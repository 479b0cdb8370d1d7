"""Learning rate: linear warm-up from zero, then constant, linear or cosine decay to ``min_lr`` (Megatron's rule)."""
from __future__ import annotations

import math

from megalm.config import OptimConfig


def learning_rate(cfg: OptimConfig, iteration: int) -> float:
    """LR for the optimizer step that produces ``iteration`` (1-based)."""
    if cfg.lr_warmup_iters > 0 and iteration <= cfg.lr_warmup_iters:
        return cfg.lr * iteration / cfg.lr_warmup_iters
    if cfg.lr_decay_style == "constant":
        return cfg.lr
    if iteration > cfg.lr_decay_iters:
        return cfg.min_lr
    span = cfg.lr_decay_iters - cfg.lr_warmup_iters
    ratio = (iteration - cfg.lr_warmup_iters) / span if span > 0 else 1.0
    if cfg.lr_decay_style == "linear":
        coeff = 1.0 - ratio
    else:
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
