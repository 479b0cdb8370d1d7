"""Rotary position embeddings: the inverse frequencies (plain, or with Llama 3.1's scaling), the cos/sin tables of
a batch's positions, and the rotation itself, in the half-split layout Hugging Face Llama uses."""
from __future__ import annotations

import math

import torch


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


def rope_tables(cfg, positions: torch.Tensor):
    """cos and sin in the half-split layout: ``[seq, rotary_dim]`` for positions ``[seq]``, or
    ``[b, 1, seq, rotary_dim]`` for per-sample positions ``[b, seq]`` (``rotary_dim``: the head size, or its
    ``--rotary-percent``)."""
    inv_freq = rope_inverse_frequencies(cfg, cfg.rotary_dim, positions.device)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    if emb.dim() == 3:
        emb = emb.unsqueeze(1)  # broadcast over heads
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate ``x`` ``[b, heads, s, d]`` by position: its first ``cos.shape[-1]`` dims (all of them, or the share
    ``--rotary-percent`` gives); the rest pass unchanged."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
