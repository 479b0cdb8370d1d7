"""FP8 training of the transformer's linear layers through torchao (``--fp8-format``, ``--fp8-recipe``).

Each column- and row-parallel linear of the blocks computes ``y = x W^T`` and its two backward matmuls from
float8 operands scaled on the fly: torchao's ``tensorwise`` (one scale per tensor) and ``rowwise`` (one per row of
each operand along the contraction, scales rounded to powers of 2) recipes as ``torchao.float8`` casts them, and
``mxfp8`` (one power-of-2 scale per 32 elements along the contraction, ``torchao.prototype.mx_formats``).
Format ``e4m3`` casts everything to e4m3; ``hybrid`` casts gradients to e5m2 (more range), as Megatron's formats.
The output layer, the router, the experts' grouped matmuls, norms and attention stay in the parameters' dtype, as
Megatron keeps them. On a CPU (and a GPU without FP8 matmuls) torchao emulates the scaled matmuls with the same
scaling; on an FP8 GPU it runs ``torch._scaled_mm``.

Tensor parallelism: a scale must come from the whole tensor one process would see, so where a cast's amax runs
over a dimension that TP splits it is reduced (MAX) over the TP group: for a column-parallel layer the weight
and the output gradient (split along the outputs), for a row-parallel one the input and the weight (split along
the contraction). MXFP8's blocks never straddle a split (the local widths are multiples of 32), so they need no
reduction. Under FSDP2 a block's weights are gathered before its forward, so their scales are whole already.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megalm.parallel.fsdp import mesh_of

MX_BLOCK = 32


@dataclass(frozen=True)
class FP8Spec:
    """How one linear layer casts: the recipe, the gradients' float8 dtype, whether matmuls are emulated, and
    which of its operands TP splits (``split``: "out" column-parallel, "in" row-parallel, None) over ``mesh``."""
    recipe: str
    grad_dtype: torch.dtype
    emulate: bool
    split: Optional[str] = None
    mesh: object = None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fp8: Optional[FP8Spec]):
    """``F.linear``, or with ``fp8`` its float8 version (the bias added in the input's precision)."""
    if fp8 is None:
        return F.linear(x, weight, bias)
    shape = x.shape
    y = _Float8Matmul.apply(x.reshape(-1, shape[-1]), weight, fp8).view(*shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@functools.lru_cache(maxsize=None)  # asked at every cast: built once per setting
def _mm_config(emulate: bool):
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

    mm = ScaledMMConfig(emulate=emulate, use_fast_accum=False)
    return LinearMMConfig(mm, mm, mm)


def _cast(t: torch.Tensor, dtype: torch.dtype, spec: FP8Spec, role: str, dim: int, reduce: bool):
    """``t`` (2-D) as a float8 tensor scaled along ``dim`` (the contraction dimension of the matmul it enters):
    per tensor (tensorwise), per slice along ``dim`` (rowwise), per 32-element block along ``dim`` (mxfp8, which
    needs ``dim`` last: the caller passes the transpose). ``reduce``: the amax spans a dimension TP splits."""
    if spec.recipe == "mxfp8":
        from torchao.prototype.mx_formats.mx_tensor import MXTensor

        return MXTensor.to_mx(t.contiguous(), dtype, MX_BLOCK)
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
    from torchao.float8.float8_training_tensor import GemmInputRole

    rowwise = spec.recipe == "rowwise"
    return hp_tensor_to_float8_dynamic(
        t, dtype, _mm_config(spec.emulate), reduce_amax=reduce and spec.mesh is not None,
        gemm_input_role={"input": GemmInputRole.INPUT, "weight": GemmInputRole.WEIGHT,
                         "grad": GemmInputRole.GRAD_OUTPUT}[role], device_mesh=spec.mesh,
        scaling_granularity=ScalingGranularity.AXISWISE if rowwise else ScalingGranularity.TENSORWISE,
        axiswise_dim=dim if rowwise else None, round_scales_to_power_of_2=rowwise)


class _Float8Matmul(torch.autograd.Function):
    """``x [M, K] @ W[N, K]^T`` with every operand of the three matmuls cast to float8 along its contraction."""

    @staticmethod
    def forward(ctx, x, weight, spec: FP8Spec):
        ctx.save_for_backward(x, weight)
        ctx.spec = spec
        e4m3 = torch.float8_e4m3fn
        tensorwise = spec.recipe == "tensorwise"
        x8 = _cast(x, e4m3, spec, "input", -1, spec.split == "in")
        if spec.recipe == "mxfp8":
            return torch.mm(x8, _cast(weight, e4m3, spec, "weight", -1, False).t())
        w8 = _cast(weight.t(), e4m3, spec, "weight", 0, spec.split == "in" or (tensorwise and spec.split == "out"))
        return torch.mm(x8, w8)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        spec = ctx.spec
        e4m3, g8 = torch.float8_e4m3fn, spec.grad_dtype
        tensorwise = spec.recipe == "tensorwise"
        out, inner = spec.split == "out", spec.split == "in"
        if spec.recipe == "mxfp8":  # blocks along each matmul's contraction: N for the input's, M for the weight's
            grad_x = torch.mm(_cast(grad, g8, spec, "grad", -1, False), _cast(weight.t(), e4m3, spec, "weight", -1,
                                                                               False).t())
            grad_w = torch.mm(_cast(grad.t(), g8, spec, "grad", -1, False), _cast(x.t(), e4m3, spec, "input", -1,
                                                                                   False).t())
            return grad_x.to(x.dtype), grad_w.to(weight.dtype), None
        grad_x = torch.mm(_cast(grad, g8, spec, "grad", -1, out),
                          _cast(weight.t(), e4m3, spec, "weight", -1, out or (tensorwise and inner)).t())
        grad_w = torch.mm(_cast(grad, g8, spec, "grad", 0, tensorwise and out).t(),
                          _cast(x, e4m3, spec, "input", 0, tensorwise and inner))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


def enable_fp8(model: torch.nn.Module, recipe: str, fmt: str, topo, device: torch.device) -> int:
    """Give every column- and row-parallel linear of the transformer blocks (and the MTP modules) an
    ``FP8Spec``; returns how many. The output layer is not in the blocks and stays in high precision."""
    emulate = not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))
    if recipe == "mxfp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (10, 0):
        emulate = True  # MX matmuls need Blackwell: emulated elsewhere, same numbers
    mesh = mesh_of(topo.tp_group) if topo.tp > 1 else None
    grad_dtype = torch.float8_e5m2 if fmt == "hybrid" else torch.float8_e4m3fn
    blocks = list(model.layers.values()) + (list(model.mtp.values()) if hasattr(model, "mtp") else [])
    need = MX_BLOCK if recipe == "mxfp8" else 16
    count = 0
    for block in blocks:
        for name, module in block.named_modules():
            split = getattr(type(module), "fp8_split", None)  # the TP layers say which side TP splits
            if split is not None:
                if any(n % need for n in module.weight.shape):
                    from megalm.config import ConfigError

                    raise ConfigError(f"--fp8-format: layer {name} has a {tuple(module.weight.shape)} weight on this "
                                      f"rank, not multiples of {need} ({recipe}); FP8 matmuls cannot take it")
                module.fp8 = FP8Spec(recipe, grad_dtype, emulate, split if topo.tp > 1 else None, mesh)
                count += 1
    return count
