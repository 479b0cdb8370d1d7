"""FSDP2 as megalm's ZeRO 3 (``--use-torch-fsdp2``): ``fully_shard`` on every transformer block (and the MTP
modules), on the experts of each MoE layer over their own group, and on the whole model for what is left (the
embedding, the final norm, the output layer).

Every parameter is sharded along dim 0 over the data-parallel ranks (DP x CP with context parallelism; the
expert-data-parallel ranks for experts, left whole when there is one), on top of megalm's own tensor, expert and pipeline parallelism: a
parameter FSDP sees is this rank's TP (EP) shard, so the 2-D layout is TP inside, FSDP outside, as torchtitan
has it, with each pipeline stage sharded over its own DP group. FSDP all-gathers a block's parameters before
its forward (and again before its backward when it resharded after forward) and reduce-scatters its gradients
after its backward, every micro-batch.

Gradients come out as megalm's other paths make them: divided by DP (not by the mesh's size: CP ranks' and
expert-parallel ranks' gradients are sums over their tokens) and summed over the mesh. What needs a sum over
another group first (sequence-parallel norm weights over TP, the tied embedding's two copies over the first and
last stage) is summed by the optimizer on the reduced shards, which line up because both sides are sharded
alike. Parameters not trained (the MoE expert bias) are left whole, and so are experts at expert-data-parallel
size 1 (the optimizer divides their gradients by DP itself).

Under ``--bf16`` / ``--fp16`` the sharded parameters stay fp32 (they are the main parameters: no separate copy)
and FSDP's ``MixedPrecisionPolicy`` casts them to the low precision as it all-gathers them; gradients are
reduced in fp32 (bf16 with ``--grad-reduce-in-bf16``). Per parameter a rank keeps (4 + 4 + 8) / DP bytes
(parameters, gradients, Adam moments), plus one block's unsharded low-precision parameters while it runs.

A sharded row range of dim 0 is a contiguous range of the flattened TP-local tensor: exactly the ZeRO slices
megalm's checkpoints already store, so FSDP2 checkpoints are the same layout-free format, with no conversion.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from megalm.parallel.state import Topology

log = logging.getLogger("megalm")


def mesh_of(group):
    """A one-dimensional device mesh over an existing process group (what FSDP and torchao's scale reduction
    take)."""
    from torch.distributed.device_mesh import DeviceMesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceMesh.from_group(group, device)


def is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of ``p``: its FSDP shard, or ``p`` itself."""
    return p._local_tensor if is_sharded(p) else p


def shard_range(p: torch.Tensor) -> tuple:
    """(start, stop) of this rank's shard in the flattened (TP-local) parameter: FSDP2 gives rank ``i`` the
    ``i``-th of ``ceil(rows / n)``-row chunks of dim 0 (the last ones short or empty)."""
    if not is_sharded(p):
        return 0, p.numel()
    rows = p.shape[0]
    mesh = p.device_mesh
    n, i = mesh.size(), mesh.get_local_rank()
    per = -(-rows // n)
    lo, hi = min(i * per, rows), min((i + 1) * per, rows)
    width = p.numel() // rows if rows else 0
    return lo * width, hi * width


def shard_values(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` (a whole TP-local tensor shaped like ``p``), shaped like its local shard."""
    if not is_sharded(p):
        return full
    lo, hi = shard_range(p)
    return full.reshape(-1)[lo:hi].view(local(p).shape)


@torch.no_grad()
def copy_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Set parameter ``p`` (sharded or not) from the whole TP-local tensor ``full``."""
    local(p).copy_(shard_values(full.to(p.device), p))


def shard_model(model: nn.Module, topo: Topology, compute_dtype: torch.dtype, reduce_dtype: torch.dtype,
                reshard_after_forward: bool) -> None:
    """Apply FSDP2 to ``model`` in place (see the module docstring); ``compute_dtype`` is the dtype the
    parameters are gathered in (bf16/fp16, or fp32), the sharded ones are fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    attrs = {name: dict(p.__dict__) for name, p in model.named_parameters()}  # tp_dim, expert, ... (lost otherwise)
    # state that is not trained (MoE expert biases) stays whole; LoRA's frozen base is sharded like the rest
    frozen = {p for p in model.parameters() if not p.requires_grad and not getattr(p, "lora_base", False)}
    if topo.edp == 1:  # each rank holds its experts alone: nothing to shard them over, and FSDP must not shard
        frozen |= {p for p in model.parameters() if getattr(p, "expert", False)}  # them over the dense group
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)
    dense_group = topo.dp_cp_group if topo.cp > 1 else topo.dp_group
    dense = mesh_of(dense_group)
    experts = mesh_of(topo.edp_group) if topo.edp_group is not None else None
    gloo = dist.get_backend() == "gloo"
    units = []

    def shard(module, mesh, reshard=reshard_after_forward):
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard,
                    ignored_params=frozen & set(module.parameters()))
        units.append(module)

    for module in model.modules():  # innermost first: experts, then the blocks that hold them
        if module is not model and _expert_module(module) and topo.edp > 1:
            shard(module, experts)
    for block in list(model.layers.values()) + (list(model.mtp.values()) if hasattr(model, "mtp") else []):
        shard(block, dense)
    shard(model, dense, reshard=False)  # the root's parameters are needed again at once by backward
    for unit in units:
        unit.set_gradient_divide_factor(float(topo.dp))  # averaged over DP, summed over CP and the expert ranks
        if gloo:  # gloo reduces with SUM only: FSDP divides before and after instead
            unit.set_force_sum_reduction_for_comms(True)
    for name, p in model.named_parameters():
        p.__dict__.update(attrs[name])
    log.info("FSDP2: %d units sharded over DP %d%s, reshard after forward %s, compute in %s, gradients reduced "
             "in %s", len(units), topo.dp * topo.cp, f" (x CP {topo.cp})" if topo.cp > 1 else "",
             "on" if reshard_after_forward else "off", str(compute_dtype).removeprefix("torch."),
             str(reduce_dtype).removeprefix("torch."))


def reshard(model: nn.Module) -> None:
    """Free what FSDP still holds gathered (the root keeps its parameters gathered after a forward that no
    backward follows: an evaluation), so the model's parameters are its shards again. No-op without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _expert_module(module: nn.Module) -> bool:
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return bool(own) and all(getattr(p, "expert", False) for p in own)
