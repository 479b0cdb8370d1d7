"""The gated linear unit the dense MLP and the experts share."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megalm.config import ModelConfig


def gated(cfg: ModelConfig, gate: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """The gated linear unit of a SwiGLU MLP or expert: act(gate) * (linear + offset), act SiLU or (with
    ``--quick-geglu``) x sigmoid(1.702 x), both halves clamped first with ``--activation-func-clamp-value``."""
    if cfg.activation_func_clamp_value is not None:
        limit = cfg.activation_func_clamp_value
        gate, linear = gate.clamp(max=limit), linear.clamp(-limit, limit)
    act = gate * torch.sigmoid(1.702 * gate) if cfg.quick_geglu else F.silu(gate)
    return act * (linear + cfg.glu_linear_offset) if cfg.glu_linear_offset else act * linear
