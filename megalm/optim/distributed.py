"""Data-parallel gradient reduction and the AdamW step, with optional ZeRO sharding of optimizer state (and
gradients) over the data-parallel group.

With context parallelism the data-parallel group is DP x CP: each CP rank's loss covers its part of every
sequence, so gradients are summed over CP and averaged over DP.

Parameters are packed into contiguous buckets (in reverse order, roughly the order backward produces gradients),
each padded to split evenly over the DP ranks, and become views into one flat fp32 buffer per bucket. As soon as
every parameter of a bucket has its gradient for the step, a hook starts the bucket's reduction asynchronously, so
communication overlaps the rest of backward:

- ZeRO 0: all-reduce each bucket; every rank updates every parameter (plain data parallelism).
- ZeRO 1: reduce-scatter each bucket; rank ``d`` updates only its 1/DP slice (its Adam moments exist for that slice
  only), then the updated slices are all-gathered back into the parameters.
- ZeRO 2: as ZeRO 1, but no full gradient buffer lives across micro-batches: each micro-batch's gradients are
  copied into a short-lived bucket, reduce-scattered, and added to this rank's slice.

Adam is elementwise, so updating slices gives exactly the unsharded result. Parameters whose gradients need a
sum over another group first (sequence-parallel norm weights over TP, the two copies of a tied embedding over the
first and last pipeline stage) sit in a separate bucket reduced after the pipeline schedule ends.

Expert parameters of MoE layers (marked ``expert``) sit in buckets of their own, reduced (and sliced by ZeRO) over
the expert-data-parallel group, the ranks that hold the same experts: their gradients already sum the tokens of
the whole expert-parallel group, which the dispatcher brought to them.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megalm.config import OptimConfig
from megalm.optim.optimizer import adamw, decays
from megalm.parallel.state import Topology


@dataclass
class Piece:
    """The part of one parameter that lies in this rank's slice of a bucket."""
    param: torch.nn.Parameter
    start: int  # offset in the flattened parameter
    values: torch.Tensor  # view into the bucket's flat parameters
    tp_sharded: bool
    counted: bool  # in the gradient norm (the last stage's copy of a tied embedding is not)
    expert: bool = False  # split over the expert-parallel ranks


@dataclass
class Bucket:
    params: list
    offsets: list  # start of each parameter in the flat buffer
    numel: int  # padded to a multiple of the number of slices
    deferred: bool  # reduced after the schedule, not from hooks
    data: Optional[torch.Tensor] = None  # flat parameters
    grad: Optional[torch.Tensor] = None  # flat gradients (ZeRO 0/1), or the short-lived copy (ZeRO 2)
    shard_grad: Optional[torch.Tensor] = None  # reduced gradients of this rank's slice (ZeRO 1/2)
    ready: int = 0  # hook calls seen since the last launch
    pending: list = field(default_factory=list)  # (work handle, output to add into shard_grad or None)
    expert: bool = False  # reduced over the expert-data-parallel group instead of the data-parallel one
    group: Optional[object] = None  # the group that reduces it (and that ZeRO slices it over)
    size: int = 1  # ranks in that group
    slices: int = 1  # 1, or ``size`` when ZeRO shards the bucket
    slice_index: int = 0
    short_lived: bool = False  # ZeRO 2: no full gradient buffer across micro-batches


class DistributedOptimizer:
    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, topo: Topology, zero_stage: int,
                 micro_batches: int, bucket_numel: int):
        self.cfg, self.topo = cfg, topo
        self.zero_stage = zero_stage if topo.dp * topo.cp > 1 else 0  # nothing to shard over one rank
        self.micro_batches = micro_batches
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        special = [p for p in params if getattr(p, "sequence_parallel", False) or getattr(p, "shared_embedding", False)]
        experts = [p for p in reversed(params) if getattr(p, "expert", False)]
        regular = [p for p in reversed(params) if all(p is not q for q in special + experts)]
        self.buckets = [self._bucket(group, False, device) for group in self._split(regular, bucket_numel)]
        self.buckets += [self._bucket(group, False, device, expert=True) for group in self._split(experts, bucket_numel)]
        if special:
            self.buckets.append(self._bucket(special, True, device))
        self.pieces = [piece for b in self.buckets for piece in self._pieces(b)]
        self.adam = adamw([pc.values for pc in self.pieces if decays(pc.param)],
                          [pc.values for pc in self.pieces if not decays(pc.param)], cfg, device.type == "cuda")
        self._owner, self._offset = {}, {}
        for b in self.buckets:
            for p, off in zip(b.params, b.offsets):
                self._owner[p], self._offset[p] = b, off
                if not b.deferred:
                    p.register_post_accumulate_grad_hook(self._on_grad)
        self.zero_grad()

    # ---- layout ----------------------------------------------------------------------------------------------

    @staticmethod
    def _split(params, bucket_numel):
        group, size = [], 0
        for p in params:
            group.append(p)
            size += p.numel()
            if size >= bucket_numel:
                yield group
                group, size = [], 0
        if group:
            yield group

    def _bucket(self, params, deferred, device, expert: bool = False) -> Bucket:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        t = self.topo
        if expert:
            group, size, index = t.edp_group, t.edp, t.edp_rank
        elif t.cp > 1:  # every context-parallel rank holds a part of each sequence: gradients summed over them too
            group, size, index = t.dp_cp_group, t.dp * t.cp, t.dp_rank * t.cp + t.cp_rank
        else:
            group, size, index = t.dp_group, t.dp, t.dp_rank
        slices = size if self.zero_stage >= 1 and size > 1 else 1
        numel = math.ceil(total / slices) * slices
        b = Bucket(params=params, offsets=offsets, numel=numel, deferred=deferred, expert=expert, group=group,
                   size=size, slices=slices, slice_index=index if slices > 1 else 0,
                   short_lived=self.zero_stage == 2 and slices > 1)
        b.data = torch.zeros(numel, dtype=torch.float32, device=device)
        for p, off in zip(params, offsets):
            if p.dtype != torch.float32:
                raise TypeError(f"parameters must be fp32 (mixed precision runs under autocast), got {p.dtype}")
            b.data[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = b.data[off:off + p.numel()].view_as(p)
        if slices > 1:
            b.shard_grad = torch.zeros(numel // slices, dtype=torch.float32, device=device)
        return b

    @staticmethod
    def _slice_range(b: Bucket):
        size = b.numel // b.slices
        return b.slice_index * size, (b.slice_index + 1) * size

    def _pieces(self, b: Bucket):
        lo, hi = self._slice_range(b)
        for p, off in zip(b.params, b.offsets):
            a, z = max(off, lo), min(off + p.numel(), hi)
            if a < z:
                yield Piece(p, a - off, b.data[a:z], getattr(p, "tp_dim", None) is not None,
                            not getattr(p, "tied_copy", False), b.expert)

    def _piece_grad(self, pc: Piece) -> torch.Tensor:
        b = self._owner[pc.param]
        lo, _ = self._slice_range(b)
        a = self._offset[pc.param] + pc.start
        src = b.shard_grad if b.slices > 1 else b.grad
        return src[a - lo: a - lo + pc.values.numel()]

    # ---- gradients -------------------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.ready = 0
            if b.shard_grad is not None:
                b.shard_grad.zero_()
            if not b.short_lived:
                if b.grad is None:
                    b.grad = torch.zeros_like(b.data)
                    for p, off in zip(b.params, b.offsets):
                        p.grad = b.grad[off:off + p.numel()].view_as(p)
                else:
                    b.grad.zero_()
            else:
                for p in b.params:
                    p.grad = None

    def _on_grad(self, p) -> None:
        b = self._owner[p]
        if b.short_lived:  # move this micro-batch's gradient into the bucket and free it
            if b.grad is None:
                b.grad = torch.zeros_like(b.data)
            off = self._offset[p]
            b.grad[off:off + p.numel()].copy_(p.grad.reshape(-1))
            p.grad = None
        b.ready += 1
        per_launch = len(b.params) * (1 if b.short_lived else self.micro_batches)
        if b.ready == per_launch:
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        """Average over data parallelism: divide by DP and sum over the bucket's group (for experts the
        expert-data-parallel ranks; their gradients already hold the other expert-parallel ranks' tokens)."""
        b.ready = 0
        if self.topo.dp > 1:
            b.grad.mul_(1.0 / self.topo.dp)
        if b.size == 1:
            return
        if b.slices == 1:
            b.pending.append((dist.all_reduce(b.grad, group=b.group, async_op=True), None))
        elif not b.short_lived:
            b.pending.append((dist.reduce_scatter_tensor(b.shard_grad, b.grad, group=b.group, async_op=True), None))
        else:
            out = torch.empty_like(b.shard_grad)
            b.pending.append((dist.reduce_scatter_tensor(out, b.grad, group=b.group, async_op=True), out))
            b.grad = None  # freed once the reduction completes

    def finish_gradients(self) -> None:
        """After the schedule: sum the special gradients over their groups, reduce every bucket not yet reduced,
        and wait for all reductions."""
        for b in self.buckets:
            if not b.deferred:
                continue
            for p in b.params:
                if b.short_lived and p.grad is None:
                    p.grad = torch.zeros_like(p)
                if getattr(p, "sequence_parallel", False) and self.topo.tp > 1:
                    dist.all_reduce(p.grad, group=self.topo.tp_group)
                if getattr(p, "shared_embedding", False):
                    dist.all_reduce(p.grad, group=self.topo.embedding_group)
            if b.short_lived:
                b.grad = torch.cat([p.grad.reshape(-1) for p in b.params]
                                   + [b.data.new_zeros(b.numel - sum(p.numel() for p in b.params))])
                for p in b.params:
                    p.grad = None
            self._launch(b)
        for b in self.buckets:
            if b.ready:  # some parameter got no gradient this step
                raise RuntimeError("a parameter received no gradient in this step; every parameter must be used")
            for work, out in b.pending:
                if work is not None:
                    work.wait()
                if out is not None:
                    b.shard_grad.add_(out)
            b.pending.clear()

    # ---- step ------------------------------------------------------------------------------------------------

    def grads(self) -> list:
        return [self._piece_grad(pc) for pc in self.pieces]

    def global_grad_norm(self, grads: list) -> float:
        """L2 norm of the whole model's gradient from this rank's slices: TP shards summed over TP, replicated
        parameters once, slices summed over DP when sharded, experts summed over the expert-parallel ranks (and
        their slices over the expert-data-parallel group), stages summed over the pipeline."""
        device = self.buckets[0].data.device
        sq_tp, sq_rep, sq_exp = (torch.zeros((), dtype=torch.float32, device=device) for _ in range(3))
        for pc, g in zip(self.pieces, grads):
            if pc.counted:
                target = sq_exp if pc.expert else sq_tp if pc.tp_sharded else sq_rep
                target += g.float().pow(2).sum()
        if self.topo.tp > 1:
            dist.all_reduce(sq_tp, group=self.topo.tp_group)
        total = sq_tp + sq_rep
        dense = [b for b in self.buckets if not b.expert and b.slices > 1]
        if dense:
            dist.all_reduce(total, group=dense[0].group)
        if any(b.expert for b in self.buckets):
            if any(b.slices > 1 for b in self.buckets if b.expert):
                dist.all_reduce(sq_exp, group=self.topo.edp_group)
            if self.topo.ep > 1:
                dist.all_reduce(sq_exp, group=self.topo.ep_group)
            if self.topo.etp > 1:
                dist.all_reduce(sq_exp, group=self.topo.etp_group)
            total = total + sq_exp
        if self.topo.pp > 1:
            dist.all_reduce(total, group=self.topo.pp_group)
        return float(total.sqrt())

    def step(self, lr: float, grad_scale: float = 1.0, timers=None) -> tuple:
        """Unscale, clip and apply AdamW at ``lr``; returns (grad norm before clipping, skipped). A non-finite norm
        (an fp16 overflow) skips the update on every rank alike. ``timers`` (``megalm.training.timers``) time the
        gradient reductions still running after backward apart from the update."""
        with timers("grads-reduce") if timers else contextlib.nullcontext():
            self.finish_gradients()
        with timers("optimizer") if timers else contextlib.nullcontext():
            return self._update(lr, grad_scale)

    def _update(self, lr: float, grad_scale: float) -> tuple:
        grads = self.grads()
        if grad_scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / grad_scale)
        norm = self.global_grad_norm(grads)
        if not math.isfinite(norm):
            return norm, True
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            torch._foreach_mul_(grads, self.cfg.clip_grad / (norm + 1e-6))
        for pc, g in zip(self.pieces, grads):
            pc.values.grad = g
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        for pc in self.pieces:
            pc.values.grad = None
        for b in self.buckets:
            if b.slices > 1:
                lo, hi = self._slice_range(b)
                dist.all_gather_into_tensor(b.data, b.data[lo:hi].clone(), group=b.group)
        return norm, False

    # ---- state in global coordinates ---------------------------------------------------------------------------

    def memory_bytes(self) -> dict:
        """This rank's persistent training state, measured from the tensors it holds (call it after a step):
        parameters, gradient buffers (full and/or this rank's slice), Adam moments as allocated."""
        def nbytes(t):
            return 0 if t is None else t.numel() * t.element_size()

        return {"param_bytes": sum(nbytes(b.data) for b in self.buckets),
                "grad_bytes": sum(nbytes(b.grad) + nbytes(b.shard_grad) for b in self.buckets),
                "optimizer_state_bytes": self.state_bytes()}

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.adam.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def checkpoint_state(self) -> tuple:
        """What this rank writes of the Adam state, with no collective: ``(whole, slices)``. ``whole`` maps a
        parameter of an unsliced bucket (every data-parallel rank holds it all) to its moments and step; ``slices``
        maps a parameter of a ZeRO-sliced bucket to this rank's pieces ``[(start, stop, moments, step and the
        parameter's values)]``, ranges of the flattened (TP-local) parameter. Host copies; empty before the first
        step."""
        whole, slices = {}, {}
        if not any(self.adam.state.get(pc.values) for pc in self.pieces):
            return whole, slices
        for b in self.buckets:  # a sliced parameter is written only as slices, also where this rank holds none
            if b.slices > 1:
                for p in b.params:
                    slices.setdefault(p, [])
        for pc in self.pieces:
            st = self.adam.state.get(pc.values)
            if not st:
                continue
            moments = {"exp_avg": st["exp_avg"].detach().cpu().clone(),
                       "exp_avg_sq": st["exp_avg_sq"].detach().cpu().clone(), "step": st["step"].detach().cpu().clone()}
            if self._owner[pc.param].slices > 1:
                moments["param"] = pc.values.detach().cpu().clone()
                slices.setdefault(pc.param, []).append((pc.start, pc.start + pc.values.numel(), moments))
            else:
                whole[pc.param] = {k: (v.view_as(pc.param) if v.ndim else v) for k, v in moments.items()}
        return whole, slices

    def load_full_state(self, state: dict) -> None:
        """``state`` maps a parameter to its whole (TP-local) moments and step, as a checkpoint reads back."""
        for pc in self.pieces:
            s = state.get(pc.param)
            if s is None:
                continue
            n = pc.values.numel()
            self.adam.state[pc.values] = {
                "step": s["step"].clone().float(),
                **{k: s[k].reshape(-1)[pc.start:pc.start + n].to(pc.values.device).clone()
                   for k in ("exp_avg", "exp_avg_sq")}}
