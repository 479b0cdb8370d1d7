"""Data-parallel gradient reduction and the AdamW step, with optional ZeRO sharding of optimizer state (and
gradients) over the data-parallel group.

With context parallelism the data-parallel group is DP x CP: each CP rank's loss covers its part of every
sequence, so gradients are summed over CP and averaged over DP.

Parameters are packed into contiguous buckets (in reverse order, roughly the order backward produces gradients),
each padded to split evenly over the DP ranks, and become views into one flat buffer per bucket, in the
parameters' dtype. As soon as every parameter of a bucket has its gradient for the step, a hook starts the bucket's
reduction asynchronously, so communication overlaps the rest of backward:

- ZeRO 0: all-reduce each bucket; every rank updates every parameter (plain data parallelism).
- ZeRO 1: reduce-scatter each bucket in place (rank ``d``'s reduced slice lands in its own part of the gradient
  buffer); rank ``d`` updates only its 1/DP slice (its Adam moments exist for that slice only), then the updated
  slices are all-gathered back into the parameters, in place.
- ZeRO 2: as ZeRO 1, but no full gradient buffer lives across micro-batches: each micro-batch's gradients are
  added into a short-lived bucket, reduce-scattered, and added to this rank's fp32 slice.

Mixed precision as Megatron does it (bf16/fp16 parameters): gradients accumulate into fp32 buffers (a hook adds
each backward's low-precision gradient and frees it; ``grad_dtype`` bf16 is ``--grad-reduce-in-bf16``), and the
optimizer keeps fp32 main parameters for this rank's slice only, next to the Adam moments; after the update they
are cast into the bucket's low-precision parameters and gathered in that dtype. Per parameter under ZeRO 1 a rank
holds 2 (parameters) + 4 (gradients) + 12/DP (main parameters and Adam) bytes. fp32 parameters have no main copy:
the optimizer updates the bucket's parameters themselves and autograd accumulates into the gradient buffer.

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
from megalm.optim.snapshot import HostStaging, host_tensor
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
    pending: list = field(default_factory=list)  # (work handle, output to add into shard_grad or None, input)
    expert: bool = False  # reduced over the expert-data-parallel group instead of the data-parallel one
    group: Optional[object] = None  # the group that reduces it (and that ZeRO slices it over)
    size: int = 1  # ranks in that group
    slices: int = 1  # 1, or ``size`` when ZeRO shards the bucket
    slice_index: int = 0
    short_lived: bool = False  # ZeRO 2: no full gradient buffer across micro-batches
    main: Optional[torch.Tensor] = None  # fp32 main parameters of this rank's slice (low-precision parameters)


class DistributedOptimizer:
    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, topo: Topology, zero_stage: int,
                 micro_batches: int, bucket_numel: int, grad_dtype: torch.dtype = torch.float32):
        self.cfg, self.topo = cfg, topo
        self.zero_stage = zero_stage if topo.dp * topo.cp > 1 else 0  # nothing to shard over one rank
        self.micro_batches = micro_batches
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        self.param_dtype, self.grad_dtype = params[0].dtype, grad_dtype
        dtypes = sorted({str(p.dtype) for p in params})
        if len(dtypes) > 1:
            raise TypeError(f"trained parameters must share one dtype, got {', '.join(dtypes)}")
        special = [p for p in params if getattr(p, "sequence_parallel", False) or getattr(p, "shared_embedding", False)]
        experts = [p for p in reversed(params) if getattr(p, "expert", False)]
        regular = [p for p in reversed(params) if all(p is not q for q in special + experts)]
        self.buckets = [self._bucket(group, False, device) for group in self._split(regular, bucket_numel)]
        self.buckets += [self._bucket(group, False, device, expert=True)
                         for group in self._split(experts, bucket_numel)]
        if special:
            self.buckets.append(self._bucket(special, True, device))
        self.pieces = [piece for b in self.buckets for piece in self._pieces(b)]
        self.adam = adamw([pc.values for pc in self.pieces if decays(pc.param)],
                          [pc.values for pc in self.pieces if not decays(pc.param)], cfg, device.type == "cuda")
        self.check_finite = False  # --check-for-nan-in-loss-and-grad: each bucket's norms before it is reduced
        self._local_norms = []
        self._owner, self._offset = {}, {}
        for b in self.buckets:
            for p, off in zip(b.params, b.offsets):
                self._owner[p], self._offset[p] = b, off
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
        b.data = torch.zeros(numel, dtype=self.param_dtype, device=device)
        for p, off in zip(params, offsets):
            b.data[off:off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = b.data[off:off + p.numel()].view_as(p)
        if self.param_dtype != torch.float32:
            lo, hi = self._slice_range(b)
            b.main = b.data[lo:hi].float()
        if b.short_lived:
            b.shard_grad = torch.zeros(numel // slices, dtype=torch.float32, device=device)
        return b

    def _grad_views(self, b: Bucket) -> bool:
        """Whether parameters' ``.grad`` are views into the bucket's gradient buffer (autograd accumulates in
        place); otherwise the hook adds each backward's gradient into the buffer and frees it."""
        return not b.short_lived and self.grad_dtype == self.param_dtype

    @staticmethod
    def _slice_range(b: Bucket):
        size = b.numel // b.slices
        return b.slice_index * size, (b.slice_index + 1) * size

    def _pieces(self, b: Bucket):
        lo, hi = self._slice_range(b)
        for p, off in zip(b.params, b.offsets):
            a, z = max(off, lo), min(off + p.numel(), hi)
            if a < z:
                values = b.data[a:z] if b.main is None else b.main[a - lo:z - lo]
                yield Piece(p, a - off, values, getattr(p, "tp_dim", None) is not None,
                            not getattr(p, "tied_copy", False), b.expert)

    def _piece_range(self, pc: Piece) -> tuple:
        """The piece's range in its bucket's flat buffers."""
        a = self._offset[pc.param] + pc.start
        return a, a + pc.values.numel()

    def _piece_grad(self, pc: Piece) -> torch.Tensor:
        """The piece's reduced gradient in fp32: in the gradient buffer itself (ZeRO 0, and ZeRO 1, whose
        reduce-scatter writes this rank's slice in place), or in the slice ZeRO 2 accumulates."""
        b = self._owner[pc.param]
        a, z = self._piece_range(pc)
        if b.short_lived:
            lo, _ = self._slice_range(b)
            return b.shard_grad[a - lo:z - lo]
        return b.grad[a:z].float()

    # ---- gradients -------------------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        self._local_norms = []
        for b in self.buckets:
            b.ready = 0
            if b.shard_grad is not None:
                b.shard_grad.zero_()
            if b.short_lived:
                b.grad = None
            elif b.grad is None:
                b.grad = self._new_grad(b)
            else:
                b.grad.zero_()
            for p, off in zip(b.params, b.offsets):
                p.grad = b.grad[off:off + p.numel()].view_as(p) if self._grad_views(b) else None

    def _new_grad(self, b: Bucket) -> torch.Tensor:
        return torch.zeros(b.numel, dtype=self.grad_dtype, device=b.data.device)

    def _on_grad(self, p) -> None:
        b = self._owner[p]
        if not self._grad_views(b):  # add this backward's gradient into the bucket and free it
            if b.grad is None:
                b.grad = self._new_grad(b)
            off = self._offset[p]
            b.grad[off:off + p.numel()].add_(p.grad.reshape(-1))
            p.grad = None
        if b.deferred:  # reduced after the schedule
            return
        b.ready += 1
        per_launch = len(b.params) * (1 if b.short_lived else self.micro_batches)
        if b.ready == per_launch:
            self._launch(b)

    def _launch(self, b: Bucket) -> None:
        """Average over data parallelism: divide by DP and sum over the bucket's group (for experts the
        expert-data-parallel ranks; their gradients already hold the other expert-parallel ranks' tokens)."""
        b.ready = 0
        if self.check_finite:  # this rank's own gradients, before the reduction spreads a NaN to every replica
            self._local_norms.append((b, torch.stack(torch._foreach_norm(
                [b.grad[off:off + p.numel()] for p, off in zip(b.params, b.offsets)]))))
        if self.topo.dp > 1:
            b.grad.mul_(1.0 / self.topo.dp)
        if b.size == 1:
            return
        if b.slices == 1:
            b.pending.append((dist.all_reduce(b.grad, group=b.group, async_op=True), None, None))
        elif not b.short_lived:  # in place: this rank's reduced slice lands in its own part of the buffer
            lo, hi = self._slice_range(b)
            b.pending.append((dist.reduce_scatter_tensor(b.grad[lo:hi], b.grad, group=b.group, async_op=True), None,
                              None))
        else:
            out = torch.empty(b.shard_grad.shape, dtype=b.grad.dtype, device=b.grad.device)
            b.pending.append((dist.reduce_scatter_tensor(out, b.grad, group=b.group, async_op=True), out, b.grad))
            b.grad = None  # freed once the reduction is waited for (held until then, not left to gloo's thread)

    def finish_gradients(self) -> None:
        """After the schedule: sum the special gradients over their groups, reduce every bucket not yet reduced,
        and wait for all reductions."""
        for b in self.buckets:
            if not b.deferred:
                continue
            if b.grad is None:  # ZeRO 2, and no gradient reached the bucket
                b.grad = self._new_grad(b)
            for p, off in zip(b.params, b.offsets):
                sum_outside_dp(p, b.grad[off:off + p.numel()], self.topo)
            self._launch(b)
        for b in self.buckets:
            if b.ready:  # some parameter got no gradient this step
                raise RuntimeError("a parameter received no gradient in this step; every parameter must be used")
            for work, out, _ in b.pending:
                if work is not None:
                    work.wait()
                if out is not None:
                    b.shard_grad.add_(out)
            b.pending.clear()

    # ---- step ------------------------------------------------------------------------------------------------

    def grads(self) -> list:
        return [self._piece_grad(pc) for pc in self.pieces]

    def global_grad_norm(self, grads: list) -> float:
        """L2 norm of the whole model's gradient from this rank's slices (``global_norm``)."""
        device = self.buckets[0].data.device
        dense = [b for b in self.buckets if not b.expert and b.slices > 1]
        return global_norm([(pc, g) for pc, g in zip(self.pieces, grads)], self.topo, device,
                           dense[0].group if dense else None,
                           any(b.slices > 1 for b in self.buckets if b.expert),
                           any(b.expert for b in self.buckets))

    def step(self, lr: float, grad_scale: float = 1.0, timers=None) -> tuple:
        """Unscale, clip and apply AdamW at ``lr``; returns (grad norm before clipping, skipped). A non-finite norm
        (an fp16 overflow) skips the update on every rank alike. ``timers`` (``megalm.training.timers``) time the
        gradient reductions still running after backward apart from the update."""
        self.reduce_gradients(timers)
        return self.update(lr, grad_scale, timers)

    def reduce_gradients(self, timers=None) -> None:
        with timers("grads-reduce") if timers else contextlib.nullcontext():
            self.finish_gradients()

    def nonfinite_params(self) -> list:
        """This rank's parameters whose own gradient (before any reduction) was NaN or Inf in this step, with
        ``check_finite`` set and the gradients reduced."""
        out = []
        for b, norms in self._local_norms:
            if not bool(torch.isfinite(norms).all()):
                out += [p for p, ok in zip(b.params, torch.isfinite(norms).tolist()) if not ok]
        return out

    def update(self, lr: float, grad_scale: float = 1.0, timers=None) -> tuple:
        with timers("optimizer") if timers else contextlib.nullcontext():
            return self._update(lr, grad_scale)

    def _update(self, lr: float, grad_scale: float) -> tuple:
        norm, skipped = adam_step(self.adam, [pc.values for pc in self.pieces], self.grads(), lr, grad_scale,
                                  self.global_grad_norm, self.cfg.clip_grad)
        if skipped:
            return norm, True
        for b in self.buckets:
            lo, hi = self._slice_range(b)
            if b.main is not None:
                b.data[lo:hi].copy_(b.main)
            if b.slices > 1:  # in place, in the parameters' dtype
                dist.all_gather_into_tensor(b.data, b.data[lo:hi], group=b.group)
        return norm, False

    # ---- state in global coordinates ---------------------------------------------------------------------------

    def memory_bytes(self) -> dict:
        """This rank's persistent training state, measured from the tensors it holds (call it after a step):
        parameters, gradient buffers (full and/or this rank's slice), fp32 main parameters (low-precision
        parameters only), Adam moments as allocated."""
        def nbytes(t):
            return 0 if t is None else t.numel() * t.element_size()

        return {"param_bytes": sum(nbytes(b.data) for b in self.buckets),
                "grad_bytes": sum(nbytes(b.grad) + nbytes(b.shard_grad) for b in self.buckets),
                "main_param_bytes": sum(nbytes(b.main) for b in self.buckets),
                "optimizer_state_bytes": self.state_bytes()}

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.adam.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    def checkpoint_state(self, staging: Optional[HostStaging] = None) -> tuple:
        """What this rank writes of the Adam state, with no collective: ``(whole, slices)``. ``whole`` maps a
        parameter of an unsliced bucket (every data-parallel rank holds it all) to its moments and step (and fp32
        ``main_param`` for low-precision parameters); ``slices`` maps a parameter of a ZeRO-sliced bucket to this
        rank's pieces ``[(start, stop, state)]``, ranges of the flattened (TP-local) parameter, whose state also
        holds the piece's ``param`` values. Host tensors (``snapshot.host_tensor``): copies into ``staging`` (an
        async save's snapshot), else the training state where it lives (a synchronous save on the CPU allocates
        nothing). Empty before the first step."""
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
            b = self._owner[pc.param]
            state = {k: host_tensor(st[k], staging) for k in ("exp_avg", "exp_avg_sq", "step")}
            if b.main is not None:
                state["main_param"] = host_tensor(pc.values, staging)
            if b.slices > 1:
                a, z = self._piece_range(pc)
                state["param"] = host_tensor(b.data[a:z], staging)
                slices.setdefault(pc.param, []).append((pc.start, pc.start + pc.values.numel(), state))
            else:
                whole[pc.param] = {k: (v.view_as(pc.param) if v.ndim else v) for k, v in state.items()}
        return whole, slices

    def snapshot_bytes(self) -> int:
        """About what an async save copies from this rank (``checkpoint_state`` and the parameters of unsliced
        buckets): what ``HostStaging.reserve`` sets aside at start-up."""
        total = 0
        for pc in self.pieces:
            b, n = self._owner[pc.param], pc.values.numel()
            total += n * (8 + (4 if b.main is not None else 0) + (b.data.element_size() if b.slices > 1 else 0))
        total += sum(b.data.numel() * b.data.element_size() for b in self.buckets if b.slices == 1)
        return total + 64 * (4 * len(self.pieces) + len(self._owner))  # alignment

    def load_main_params(self, values: dict) -> None:
        """Set the fp32 main parameters (low-precision parameters only) from ``values`` (``{parameter: its
        TP-local values}``, e.g. a checkpoint's fp32 main parameters or fp32 weights), else from the parameters
        themselves, so a resumed run continues from the full-precision values it saved."""
        for pc in self.pieces:
            b = self._owner[pc.param]
            if b.main is None:
                continue
            v = values.get(pc.param)
            if v is None:
                a, z = self._piece_range(pc)
                pc.values.copy_(b.data[a:z])
            else:
                pc.values.copy_(v.reshape(-1)[pc.start:pc.start + pc.values.numel()])

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


def sum_outside_dp(p, grad: torch.Tensor, topo: Topology) -> None:
    """Sum, in place, what ``p``'s gradient needs beyond data parallelism: over TP for a sequence-parallel
    replicated parameter (each rank saw its part of the sequence), over the first and last stage for the tied
    embedding's two copies."""
    if getattr(p, "sequence_parallel", False) and topo.tp > 1:
        dist.all_reduce(grad, group=topo.tp_group)
    if getattr(p, "shared_embedding", False):
        dist.all_reduce(grad, group=topo.embedding_group)


def adam_step(adam, tensors: list, grads: list, lr: float, grad_scale: float, norm_of, clip: float) -> tuple:
    """One AdamW step of ``adam`` over ``tensors`` with ``grads``: divided by the loss scale, their global norm
    measured (``norm_of(grads)``) and, over ``clip`` (> 0), scaled down to it; a non-finite norm skips the step.
    Returns (the norm before clipping, skipped)."""
    if grad_scale != 1.0:
        torch._foreach_mul_(grads, 1.0 / grad_scale)
    norm = norm_of(grads)
    if not math.isfinite(norm):
        return norm, True
    if clip > 0 and norm > clip:
        torch._foreach_mul_(grads, clip / (norm + 1e-6))
    for t, g in zip(tensors, grads):
        t.grad = g
    for group in adam.param_groups:
        group["lr"] = lr
    adam.step()
    for t in tensors:
        t.grad = None
    return norm, False


def global_norm(pieces, topo: Topology, device, dense_group, experts_sliced: bool, has_experts: bool) -> float:
    """L2 norm of the whole model's gradient from ``(piece, gradient)`` pairs of what this rank holds (``piece``
    with ``tp_sharded``, ``expert`` and ``counted``): TP shards summed over TP, replicated parameters once,
    slices summed over ``dense_group`` when the dense parameters are sharded over it, experts summed over the
    expert-parallel ranks (and over the expert-data-parallel group when ``experts_sliced``), stages summed over
    the pipeline."""
    kinds = ([], [], [])  # TP-sharded, replicated, experts: one fused norm kernel per kind
    for pc, g in pieces:
        if pc.counted and g.numel():
            kinds[2 if pc.expert else 0 if pc.tp_sharded else 1].append(g.float())
    sq_tp, sq_rep, sq_exp = (torch.stack(torch._foreach_norm(gs)).pow(2).sum() if gs else
                             torch.zeros((), dtype=torch.float32, device=device) for gs in kinds)
    if topo.tp > 1:
        dist.all_reduce(sq_tp, group=topo.tp_group)
    total = sq_tp + sq_rep
    if dense_group is not None:
        dist.all_reduce(total, group=dense_group)
    if has_experts:
        if experts_sliced:
            dist.all_reduce(sq_exp, group=topo.edp_group)
        if topo.ep > 1:
            dist.all_reduce(sq_exp, group=topo.ep_group)
        if topo.etp > 1:
            dist.all_reduce(sq_exp, group=topo.etp_group)
        total = total + sq_exp
    if topo.pp > 1:
        dist.all_reduce(total, group=topo.pp_group)
    return float(total.sqrt())
