"""AdamW over FSDP2's sharded parameters (``megalm.parallel.fsdp``): the same interface as
``DistributedOptimizer``, so the Trainer, its logging and its checkpoints are unchanged.

Adam runs on each parameter's local shard (elementwise, so sharded updates give the unsharded result), with its
moments for that shard only. The gradient norm and clipping follow megalm's rules over the shards
(``distributed.global_norm``: every dense parameter is sliced over the DP mesh, experts over theirs). For
checkpoints, each rank's shard is a ``[start, stop)`` range of the flattened TP-local parameter: it is written as
the ZeRO slices the other paths write (values in the run's parameter dtype, fp32 main values for bf16/fp16
runs, and the moments), and read back from whole TP-local tensors, so any layout loads it and it loads any.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from megalm.config import OptimConfig
from megalm.optim.distributed import adam_step, global_norm, sum_outside_dp
from megalm.optim.optimizer import adamw, decays
from megalm.optim.snapshot import HostStaging, host_tensor
from megalm.parallel.fsdp import is_sharded, local, shard_range, shard_values
from megalm.parallel.state import Topology


@dataclass
class Shard:
    """This rank's shard of one parameter, with what the gradient norm needs to know of it."""
    param: torch.nn.Parameter
    values: torch.Tensor  # the local shard (fp32)
    tp_sharded: bool
    counted: bool
    expert: bool


class FSDPOptimizer:
    zero_stage = 3

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, topo: Topology, param_dtype: torch.dtype):
        """``param_dtype``: the run's parameter dtype (bf16/fp16/fp32), what checkpoints hold as the weights."""
        self.cfg, self.topo, self.param_dtype = cfg, topo, param_dtype
        params = [p for p in model.parameters() if p.requires_grad]
        self.shards = [Shard(p, local(p), getattr(p, "tp_dim", None) is not None,
                             not getattr(p, "tied_copy", False), getattr(p, "expert", False)) for p in params]
        self.device = params[0].device
        self.adam = adamw([s.values for s in self.shards if decays(s.param)],
                          [s.values for s in self.shards if not decays(s.param)], cfg, self.device.type == "cuda")
        self.dense_group = topo.dp_cp_group if topo.cp > 1 else topo.dp_group
        self.has_experts = any(s.expert for s in self.shards)
        self.check_finite, self._grads = False, []

    def zero_grad(self) -> None:
        for s in self.shards:
            s.param.grad = None

    def grads(self) -> list:
        """Each shard's reduced gradient (zeros where a parameter got none: a rank whose shard is empty)."""
        out = []
        for s in self.shards:
            g = s.param.grad
            g = local(g) if g is not None else torch.zeros_like(s.values)
            if not is_sharded(s.param):  # experts FSDP leaves whole (one rank holds them): averaged over DP here
                g.mul_(1.0 / self.topo.dp)
            out.append(g)
        return out

    def finish_gradients(self, grads: list) -> None:
        """Sum the gradients that FSDP's reduction over DP does not: sequence-parallel norm weights over TP (each
        rank saw its part of the sequence), the tied embedding's copies over the first and last stage."""
        for s, g in zip(self.shards, grads):
            sum_outside_dp(s.param, g, self.topo)

    def global_grad_norm(self, grads: list) -> float:
        return global_norm(list(zip(self.shards, grads)), self.topo, self.device, self.dense_group,
                           self.topo.edp > 1, self.has_experts)

    def step(self, lr: float, grad_scale: float = 1.0, timers=None) -> tuple:
        """As ``DistributedOptimizer.step``: (grad norm before clipping, skipped)."""
        self.reduce_gradients(timers)
        return self.update(lr, grad_scale, timers)

    def reduce_gradients(self, timers=None) -> None:
        with timers("grads-reduce") if timers else contextlib.nullcontext():
            self._grads = self.grads()
            self.finish_gradients(self._grads)

    def nonfinite_params(self) -> list:
        """Parameters whose shard of the reduced gradient on this rank is NaN or Inf (FSDP reduces inside
        backward, so this names the rank that holds the shard, not always the one whose data caused it)."""
        norms = torch.stack(torch._foreach_norm(self._grads)) if self._grads else torch.zeros(0)
        return [s.param for s, ok in zip(self.shards, torch.isfinite(norms).tolist()) if not ok]

    def update(self, lr: float, grad_scale: float = 1.0, timers=None) -> tuple:
        grads, self._grads = self._grads, []
        with timers("optimizer") if timers else contextlib.nullcontext():
            return adam_step(self.adam, [s.values for s in self.shards], grads, lr, grad_scale,
                             self.global_grad_norm, self.cfg.clip_grad)

    # ---- memory and checkpoints ----------------------------------------------------------------------------

    def memory_bytes(self) -> dict:
        """This rank's persistent state, measured from its tensors (after a step): the fp32 shards (also the
        main parameters of a bf16/fp16 run, so none are counted apart), their gradients, the Adam moments."""
        def nbytes(t):
            return 0 if t is None else t.numel() * t.element_size()

        return {"param_bytes": sum(nbytes(s.values) for s in self.shards),
                "grad_bytes": sum(nbytes(local(s.param.grad)) for s in self.shards if s.param.grad is not None),
                "main_param_bytes": 0, "optimizer_state_bytes": self.state_bytes()}

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.adam.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def checkpoint_state(self, staging: Optional[HostStaging] = None) -> tuple:
        """``({}, slices)`` as ``DistributedOptimizer.checkpoint_state``: every parameter is sliced, each rank
        writing its shard's range (none where its shard is empty). Before the first step the slices hold the
        values alone."""
        slices = {}
        low = self.param_dtype != torch.float32
        for s in self.shards:
            slices[s.param] = []
            if s.values.numel() == 0:
                continue
            start, stop = shard_range(s.param)
            state = {k: host_tensor(v, staging) for k, v in self.adam.state.get(s.values, {}).items()}
            state["param"] = host_tensor(s.values.to(self.param_dtype) if low else s.values, staging)
            if low:
                state["main_param"] = host_tensor(s.values, staging)
            slices[s.param].append((start, stop, state))
        return {}, slices

    def snapshot_bytes(self) -> int:
        per = 8 + 4 + (4 + self.param_dtype.itemsize if self.param_dtype != torch.float32 else 4)
        return sum(s.values.numel() * per + 64 * 5 for s in self.shards)

    @torch.no_grad()
    def load_main_params(self, values: dict) -> None:
        """Set the fp32 shards from ``values`` (``{parameter: whole TP-local values}``, a checkpoint's fp32 main
        parameters or fp32 weights); parameters missing there keep what the weights loaded."""
        for s in self.shards:
            v = values.get(s.param)
            if v is not None:
                s.values.copy_(shard_values(v.to(s.values.device, torch.float32), s.param))

    def load_full_state(self, state: dict) -> None:
        """``state`` maps a parameter to its whole (TP-local) moments and step, as a checkpoint reads back."""
        for s in self.shards:
            st = state.get(s.param)
            if st is None:
                continue
            self.adam.state[s.values] = {
                "step": st["step"].clone().float(),
                **{k: shard_values(st[k].to(s.values.device), s.param).clone() for k in ("exp_avg", "exp_avg_sq")}}
