"""Rotary position embeddings: the inverse frequencies (plain, or with Llama 3.1's scaling), the cos/sin tables of
a batch's positions, and the rotation itself, in the half-split layout Hugging Face Llama uses."""
from __future__ import annotations

import math

import torch


def rope_inverse_frequencies(m, head_dim: int, device=None) -> torch.Tensor:
    """RoPE's ``head_dim / 2`` inverse frequencies, with Llama 3.1's scaling under ``--use-rope-scaling`` or YaRN's
    under ``--rope-type yarn``."""
    inv = 1.0 / (m.rotary_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    if m.rope_type == "yarn":
        return _yarn(m, inv, head_dim)
    if not m.use_rope_scaling:
        return inv
    factor, low, high = m.rope_scaling_factor, m.rope_scaling_low_freq_factor, m.rope_scaling_high_freq_factor
    original = m.rope_scaling_original_max_position_embeddings
    wavelength = 2 * math.pi / inv
    scaled = torch.where(wavelength > original / low, inv / factor, inv)  # long wavelengths: divided
    smooth = (original / wavelength - low) / (high - low)
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def _yarn(m, inv: torch.Tensor, dim: int) -> torch.Tensor:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than ``--beta-slow`` times over the original context
    are divided by the factor (interpolated), those that turn more than ``--beta-fast`` times are kept
    (extrapolated), a linear ramp over the dims between."""
    def correction_dim(rotations):
        return dim * math.log(m.original_max_position_embeddings / (rotations * 2 * math.pi)) / \
            (2 * math.log(m.rotary_base))

    low, high = correction_dim(m.beta_fast), correction_dim(m.beta_slow)
    if m.yarn_correction_range_round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=inv.device) - low) / ((high - low) or 0.001)
    keep = 1 - ramp.clamp(0, 1)  # 1: extrapolated (kept), 0: interpolated
    return inv / m.rotary_scaling_factor * (1 - keep) + inv * keep


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(m) -> float:
    """YaRN's correction of the attention scale, applied to cos and sin (so to the rotated dims of q and k)."""
    if m.mscale and m.mscale_all_dim:
        return _yarn_mscale(m.rotary_scaling_factor, m.mscale) / _yarn_mscale(m.rotary_scaling_factor, m.mscale_all_dim)
    return _yarn_mscale(m.rotary_scaling_factor, 1.0)


def yarn_softmax_factor(m) -> float:
    """What multi-latent attention under YaRN multiplies its softmax scale by (DeepSeek's and Megatron's): the
    correction of ``--mscale-all-dim``, squared; 1 otherwise."""
    if m.rope_type != "yarn" or not m.mscale_all_dim:
        return 1.0
    return _yarn_mscale(m.rotary_scaling_factor, m.mscale_all_dim) ** 2


def rope_tables(cfg, positions: torch.Tensor):
    """cos and sin in the half-split layout: ``[seq, rotary_dim]`` for positions ``[seq]``, or
    ``[b, 1, seq, rotary_dim]`` for per-sample positions ``[b, seq]`` (``rotary_dim``: the head size, or its
    ``--rotary-percent``)."""
    inv_freq = rope_inverse_frequencies(cfg, cfg.rotary_dim, positions.device)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    if emb.dim() == 3:
        emb = emb.unsqueeze(1)  # broadcast over heads
    if cfg.rope_type == "yarn":
        factor = yarn_attention_factor(cfg)
        return emb.cos() * factor, emb.sin() * factor
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
