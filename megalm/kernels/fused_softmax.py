"""Fused scale + mask + softmax for attention scores ``[b, heads, sq, sk]``, with its gate and torch reference.

``y = softmax(scale * x + mask)``: padding-masked entries (mask True) are filled with -10000 and a fully masked
row gives zeros; causal entries above the diagonal are -inf; accumulation in fp32. The gate picks the compiled
kernel (C++ on CPU for fp32/bf16; CUDA for fp16/bf16 under Megatron's shape rule) and otherwise falls back to the
reference, saying why once in the log.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from megalm.kernels import extension

log = logging.getLogger("megalm")

UNMASKED, PADDING, CAUSAL = 0, 1, 2


def softmax_reference(x: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None,
                      causal: bool = False) -> torch.Tensor:
    """The definition, in plain torch: what every kernel is tested against."""
    s = x.float() * scale
    if causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(mask, -10000.0)
    y = torch.softmax(s, dim=-1)
    if mask is not None:
        y = y.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)
    return y.to(x.dtype)


@functools.lru_cache(maxsize=None)
def _say_fallback(reason: str) -> None:
    log.info("fused softmax: using the torch reference (%s)", reason)


def unsupported_reason(x: torch.Tensor, mask: Optional[torch.Tensor], causal: bool) -> Optional[str]:
    """Why the compiled kernel cannot take this input, or None when it can."""
    ext = extension()
    if ext is None:
        return "megalm._C is not built"
    if x.dim() != 4:
        return f"scores must be 4-D [b, heads, sq, sk], got {tuple(x.shape)}"
    b, h, sq, sk = x.shape
    if causal and sq != sk:
        return f"causal needs sq == sk, got {sq} and {sk}"
    if mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, b)
                             or tuple(mask.shape[2:]) != (sq, sk)):
        return f"mask must be [b or 1, 1, sq, sk], got {tuple(mask.shape)}"
    if x.is_cuda:
        if not getattr(ext, "with_cuda", False):
            return "megalm._C was built without CUDA"
        if x.dtype not in (torch.float16, torch.bfloat16):
            return f"CUDA kernel takes fp16/bf16, got {x.dtype}"
        if not (16 < sk <= 4096 and sq % 4 == 0 and sk % 4 == 0 and (b * h) % 4 == 0):
            return f"CUDA kernel needs 16 < sk <= 4096 and sq, sk, b*heads multiples of 4 (got {tuple(x.shape)})"
        return None
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"CPU kernel takes fp32/bf16, got {x.dtype}"
    return None


class _FusedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, kind):
        ext = extension()
        forward = ext.fused_softmax_forward_cuda if x.is_cuda else ext.fused_softmax_forward_cpu
        y = forward(x, mask, scale, kind)
        ctx.save_for_backward(y)
        ctx.scale, ctx.kind = scale, kind
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        ext = extension()
        backward = ext.fused_softmax_backward_cuda if y.is_cuda else ext.fused_softmax_backward_cpu
        return backward(dy.contiguous(), y, ctx.scale, ctx.kind), None, None, None


def fused_softmax(x: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None,
                  causal: bool = False) -> torch.Tensor:
    """``softmax(scale * x + mask)`` through the kernel when the gate allows, else the reference."""
    if causal and mask is not None:
        raise ValueError("fused_softmax: give either a padding mask or causal=True, not both")
    reason = unsupported_reason(x, mask, causal)
    if reason is not None:
        _say_fallback(reason)
        return softmax_reference(x, scale, mask, causal)
    kind = CAUSAL if causal else PADDING if mask is not None else UNMASKED
    return _FusedSoftmax.apply(x, mask, float(scale), kind)
