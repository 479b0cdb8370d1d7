"""Attention options of the model config that today's Hugging Face families need (Megatron's flag names where
Megatron has them), and their validation.

``ModelConfig`` inherits these fields, so they live in the ``model`` section of YAML files and checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from megalm.config_fields import ConfigError, opt


@dataclass
class AttentionOptions:
    add_qkv_bias: bool = opt(False, "biases on the query, key and value projections only, also with "
                             "--disable-bias-linear (Qwen2/2.5)")
    use_rope_scaling: bool = opt(False, "Llama 3.1's RoPE frequency scaling (transformers' rope_type llama3): "
                                 "long wavelengths divided by --rope-scaling-factor, a smooth blend between")
    rope_scaling_factor: float = opt(8.0, "with --use-rope-scaling: how much the long wavelengths are stretched")
    rope_scaling_low_freq_factor: float = opt(1.0, "with --use-rope-scaling: wavelengths above original length / "
                                              "this are scaled fully")
    rope_scaling_high_freq_factor: float = opt(4.0, "with --use-rope-scaling: wavelengths below original length / "
                                               "this are left alone")
    rope_scaling_original_max_position_embeddings: int = opt(8192, "with --use-rope-scaling: the context length "
                                                             "the model was trained at before scaling")
    sliding_window: Optional[int] = opt(None, "each query sees only the last this-many positions, itself included "
                                        "(Mistral; transformers' sliding_window)")


def rope_inverse_frequencies(m, head_dim: int, device=None) -> torch.Tensor:
    """RoPE's ``head_dim / 2`` inverse frequencies, with Llama 3.1's scaling under ``--use-rope-scaling``."""
    inv = 1.0 / (m.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if not m.use_rope_scaling:
        return inv
    factor, low, high = m.rope_scaling_factor, m.rope_scaling_low_freq_factor, m.rope_scaling_high_freq_factor
    original = m.rope_scaling_original_max_position_embeddings
    wavelength = 2 * math.pi / inv
    scaled = torch.where(wavelength > original / low, inv / factor, inv)  # long wavelengths: divided
    smooth = (original / wavelength - low) / (high - low)
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def validate_attention(m, p) -> None:
    if m.use_rope_scaling:
        if m.position_embedding_type != "rope":
            raise ConfigError("--use-rope-scaling needs --position-embedding-type rope")
        if m.rope_scaling_factor <= 0 or m.rope_scaling_high_freq_factor <= m.rope_scaling_low_freq_factor or \
                m.rope_scaling_low_freq_factor <= 0 or m.rope_scaling_original_max_position_embeddings < 1:
            raise ConfigError("--use-rope-scaling: --rope-scaling-factor and --rope-scaling-low-freq-factor must be "
                              "positive, --rope-scaling-high-freq-factor above the low one, "
                              "--rope-scaling-original-max-position-embeddings at least 1")
    if m.sliding_window is not None:
        if m.sliding_window < 1:
            raise ConfigError(f"--sliding-window must be at least 1, got {m.sliding_window}")
        if p.context_parallel_size > 1:
            raise ConfigError("--sliding-window is not applied under --context-parallel-size > 1: each rank's "
                              "attention spans whole chunks of the sequence")
