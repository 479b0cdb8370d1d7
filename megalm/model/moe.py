"""Mixture of experts: a router picks ``k`` of ``E`` expert MLPs for every token, and the layer returns their
outputs weighted by the router's probabilities (plus an optional shared expert every token goes through).

Reads like the dense MLP it replaces; the communication lives in ``megalm/parallel/experts.py`` (the dispatcher),
and the parameters carry marks the optimizer and checkpoints read: ``expert`` (split over the expert-parallel
ranks along dim 0, gradients reduced over the expert-data-parallel group).

Load balancing (``--moe-router-load-balancing-type``): the Switch/GShard auxiliary loss
``coeff * E / (k T^2) * sum_e (sum_t p_te) * n_e`` over a micro-batch's ``T`` tokens (``seq_aux_loss``: per
sequence, averaged), the router z-loss ``coeff * mean_t logsumexp(logits_t)^2``, and the aux-loss-free expert bias
(added to the scores for the choice only, moved once per step against each expert's load error). Under sequence
parallelism the sums run over the whole micro-batch (all TP ranks), so every layout computes one process's values.
Each loss reaches the gradients through the layer's output (``_AttachAux``), so it works on any pipeline stage.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.model.activations import gated
from megalm.parallel.experts import dispatch_allgather, dispatch_alltoall, dispatch_local
from megalm.parallel.lora import active
from megalm.parallel.context import local_indices
from megalm.parallel.mappings import gather_dim0, gather_values_dim0, reduce_from_tp, reduce_scatter_dim0
from megalm.parallel.state import Topology


class MoEStats:
    """What MoE layers share with the trainer: the scale their losses' gradients take (the loss scale over the
    micro-batches of a step), and per layer what the step's micro-batches routed: summed aux and z losses and
    tokens per expert (global over the micro-batch), for logging and the expert-bias update."""

    def __init__(self):
        self.loss_scale = 1.0
        self.layers = {}

    def record(self, layer: str, counts: torch.Tensor, aux: Optional[torch.Tensor], z: Optional[torch.Tensor],
               dropped) -> None:
        """Accumulated as tensors (no host sync per micro-batch); read once per step by ``finish_step``."""
        row = self.layers.setdefault(layer, {"counts": torch.zeros_like(counts, dtype=torch.float64),
                                             "aux_loss": 0.0, "z_loss": 0.0, "micro_batches": 0, "dropped": 0.0})
        row["counts"] += counts.double()
        row["aux_loss"] = row["aux_loss"] + (aux if aux is not None else 0.0)
        row["z_loss"] = row["z_loss"] + (z if z is not None else 0.0)
        row["micro_batches"] += 1
        row["dropped"] = row["dropped"] + dropped

    def reset(self) -> None:
        self.layers = {}


class _AttachAux(torch.autograd.Function):
    """Identity on the layer's output; the backward also gives ``loss`` the gradient ``scale`` (as if it had been
    added to the training loss), wherever in the pipeline the layer runs."""

    @staticmethod
    def forward(ctx, output, loss, stats: MoEStats):
        ctx.scale, ctx.like = stats.loss_scale, loss
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full_like(ctx.like, ctx.scale), None


def _sum_over_token_ranks(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """Sum over the ranks that split the micro-batch's tokens (TP under sequence parallelism, CP; each routed its
    own part): autograd-aware, the gradient flows to each rank's own part. Unchanged when a rank has them all."""
    group, size = topo.token_split
    return reduce_from_tp(x.clone(), group) if size > 1 else x  # summed in place: not into what x is


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig, topo: Topology):
        super().__init__()
        self.cfg, self.topo = cfg, topo
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.weight.tp_dim = None
        self.weight.sequence_parallel = topo.sequence_parallel  # sees this rank's tokens only: summed over TP
        self.bias = None
        if cfg.add_bias_linear:  # as Megatron's router (GPT-OSS has one)
            self.bias = nn.Parameter(torch.zeros(cfg.num_experts))
            self.bias.tp_dim, self.bias.sequence_parallel = None, topo.sequence_parallel
        if cfg.moe_router_enable_expert_bias:  # state, not trained: the optimizer skips it, checkpoints keep it
            self.expert_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            self.expert_bias.tp_dim = None

    def forward(self, x: torch.Tensor, batch: int):
        """x ``[T, h]`` (``batch`` sequences); returns experts ``[T, k]``, probabilities ``[T, k]``, the
        load-balancing and z losses (None when off) and the tokens per expert over the micro-batch."""
        c, k, E = self.cfg, self.cfg.moe_router_topk, self.cfg.num_experts
        logits = F.linear(x.float(), self.weight.float(),  # the router in fp32, also under autocast
                          self.bias.float() if self.bias is not None else None)
        if c.moe_router_score_function == "softmax":
            scores = torch.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
        choose = scores.detach()
        if hasattr(self, "expert_bias"):
            choose = choose + self.expert_bias
        if c.moe_router_num_groups:
            choose = self._limit_to_groups(choose)
        experts = torch.topk(choose, k, dim=-1).indices
        if c.moe_router_score_function == "softmax" and not c.moe_router_pre_softmax:
            probs = torch.softmax(logits.gather(1, experts), dim=-1)
        else:
            probs = scores.gather(1, experts)
            if c.moe_router_score_function == "sigmoid" and k > 1:
                probs = probs / probs.sum(-1, keepdim=True)
        if c.moe_router_topk_scaling_factor is not None:
            probs = probs * c.moe_router_topk_scaling_factor
        counts = torch.bincount(experts.reshape(-1), minlength=E)
        global_counts = _sum_over_token_ranks(counts.float(), self.topo)
        aux = self._balance_loss(scores, experts, global_counts, batch, x.shape[0]) \
            if c.moe_aux_loss_coeff > 0 and c.moe_router_load_balancing_type != "none" else None
        z = None
        if c.moe_z_loss_coeff:
            tokens = x.shape[0] * self.topo.token_split[1]
            squares = torch.logsumexp(logits, dim=-1).pow(2).sum()
            z = c.moe_z_loss_coeff * _sum_over_token_ranks(squares, self.topo) / tokens
        return experts, probs, aux, z, global_counts

    def _limit_to_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """Only experts of the best ``--moe-router-group-topk`` groups stay eligible; a group's score is the sum
        of its top ``k / group_topk`` expert scores (DeepSeek-V3's rule)."""
        c = self.cfg
        groups, per = c.moe_router_num_groups, c.num_experts // c.moe_router_num_groups
        top_in_group = max(1, c.moe_router_topk // c.moe_router_group_topk)
        grouped = scores.view(-1, groups, per)
        group_scores = grouped.topk(min(top_in_group, per), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(c.moe_router_group_topk, dim=-1).indices, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(scores)

    def _balance_loss(self, scores, experts, global_counts, batch: int, tokens: int) -> torch.Tensor:
        c, k, E = self.cfg, self.cfg.moe_router_topk, self.cfg.num_experts
        if c.moe_router_score_function == "sigmoid":
            scores = scores / scores.sum(-1, keepdim=True)
        split = self.topo.token_split[1]
        if c.moe_router_load_balancing_type == "aux_loss":
            total = tokens * split
            score_sums = _sum_over_token_ranks(scores.sum(0), self.topo)
            return c.moe_aux_loss_coeff * E / (k * total * total) * (score_sums * global_counts).sum()
        # seq_aux_loss: the same per sequence, averaged over the micro-batch's sequences
        seq = tokens // batch * split
        per_seq = scores.view(batch, -1, E).sum(1)
        seq_counts = torch.zeros(batch, E, device=scores.device).scatter_add_(
            1, experts.view(batch, -1), torch.ones(experts.numel(), device=scores.device).view(batch, -1))
        per_seq = _sum_over_token_ranks(per_seq, self.topo)
        seq_counts = _sum_over_token_ranks(seq_counts, self.topo).detach()
        return c.moe_aux_loss_coeff * E / (k * seq * seq) * (per_seq * seq_counts).sum() / batch


class GroupedExperts(nn.Module):
    """This rank's experts, stacked: ``w1 [E_local, h, f]`` (and ``w3`` with SwiGLU), ``w2 [E_local, f, h]``;
    global tensors are ``[E, ...]``, split over the expert-parallel ranks along dim 0, and with expert tensor
    parallelism along the width ``f`` (``etp_dim``): each rank then returns partial sums."""

    def __init__(self, cfg: ModelConfig, topo: Topology):
        super().__init__()
        self.cfg, self.swiglu = cfg, cfg.swiglu
        local, h, f = cfg.num_experts // topo.ep, cfg.hidden_size, cfg.moe_ffn_hidden_size // topo.etp
        names = ("w1", "w3", "w2") if cfg.swiglu else ("w1", "w2")
        for name in names:
            p = nn.Parameter(torch.empty((local, f, h) if name == "w2" else (local, h, f)))
            p.tp_dim, p.expert, p.etp_dim = None, True, 1 if name == "w2" else 2
            setattr(self, name, p)
        self.biased = cfg.add_bias_linear  # b1 (b3) [E_local, f] and b2 [E_local, h], as Megatron's experts
        for name in ("b1", "b3", "b2") if self.biased and cfg.swiglu else ("b1", "b2") if self.biased else ():
            p = nn.Parameter(torch.zeros((local, h) if name == "b2" else (local, f)))
            p.tp_dim, p.expert, p.etp_dim, p.no_decay = None, True, 1, True  # ETP > 1 with biases is refused
            setattr(self, name, p)
        self.lora = None  # under --lora-rank: an ``ExpertLoRA`` per stack (``megalm.model.lora``)

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Tokens ``[N, h]`` sorted by local expert, ``counts`` per local expert -> outputs ``[N, h]``."""
        dtype = torch.get_autocast_dtype(tokens.device.type) if torch.is_autocast_enabled(tokens.device.type) \
            else tokens.dtype
        x = tokens.to(dtype)
        w = {name: getattr(self, name).to(dtype) for name in (("w1", "w3", "w2") if self.swiglu else ("w1", "w2"))}
        # grouped matmuls need rows of a multiple of 16 bytes; other widths take the loop, and so does fp32 under
        # torch.compile (the grouped matmul's shape function takes bf16 only, its CPU kernel fp32 too)
        grouped = self.cfg.moe_grouped_gemm and not (torch.compiler.is_compiling() and x.dtype == torch.float32)
        offs, bounds = None, None

        def mm(a, weight):
            nonlocal offs, bounds
            if grouped and all(d * a.element_size() % 16 == 0 for d in weight.shape[1:]):
                offs = torch.cumsum(counts, 0).to(torch.int32) if offs is None else offs
                return torch._grouped_mm(a.contiguous(), weight, offs=offs)
            bounds = [0] + torch.cumsum(counts, 0).tolist() if bounds is None else bounds
            return torch.cat([a[bounds[e]:bounds[e + 1]] @ weight[e] for e in range(weight.shape[0])])  # reference
        if self.biased:  # the expert of each row, whose bias it gets
            rows = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts.to(x.device),
                                           output_size=x.shape[0])

        def linear(a, name):
            out = mm(a, w[name])
            if self.lora is not None and active(self.lora[name]):
                out = out + self.lora[name](a, mm)
            return out + getattr(self, "b" + name[1]).to(dtype)[rows] if self.biased else out

        hidden = gated(self.cfg, linear(x, "w1"), linear(x, "w3")) if self.swiglu else \
            F.gelu(linear(x, "w1"), approximate=self.cfg.gelu_approximation)
        return _ContiguousGrad.apply(linear(hidden, "w2"))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped matmuls refuse stride-0 ones)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, topo: Topology, layer: str, stats: MoEStats, shared: Optional[nn.Module]):
        super().__init__()
        self.cfg, self.topo, self.layer, self.stats = cfg, topo, layer, stats
        self.router = Router(cfg, topo)
        self.experts = GroupedExperts(cfg, topo)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        experts, probs, aux, z, counts = self.router(flat, b)
        dropped, compute = 0.0, self.experts
        if self.cfg.moe_expert_capacity_factor is not None:
            experts, dropped, capacity = self._drop_over_capacity(experts, probs, b)
            if self.cfg.moe_pad_expert_input_to_capacity:
                compute = _PaddedToCapacity(self.experts, capacity * self.topo.ep * self.topo.etp)
        c, topo = self.cfg, self.topo
        if topo.etp > 1:  # every rank of an expert's width needs all the tokens its ETP group routed
            flat, experts, probs = (gather_dim0(t, topo.etp_group) for t in (flat, experts, probs))
        if topo.ep == 1:
            y = dispatch_local(flat, experts, probs, c.num_experts, compute)
        elif c.moe_token_dispatcher_type == "allgather":
            y = dispatch_allgather(flat, experts, probs, c.num_experts, compute, topo.ep_group, topo.ep_rank)
        else:
            y = dispatch_alltoall(flat, experts, probs, c.num_experts, compute, topo.ep_group)
        if topo.etp > 1:  # partial sums over the width: summed, and each rank keeps its own tokens
            y = reduce_scatter_dim0(y, topo.etp_group)
        y = y.view(b, s, h)
        if self.shared is not None:
            y = y + self.shared(x)
        if self.training:
            self.stats.record(self.layer, counts.detach(), aux.detach() if aux is not None else None,
                              z.detach() if z is not None else None, dropped)
            if torch.is_grad_enabled():
                for loss in (aux, z):
                    if loss is not None:
                        y = _AttachAux.apply(y, loss, self.stats)
        return y

    def _drop_over_capacity(self, experts: torch.Tensor, probs: torch.Tensor, b: int = 1):
        """Each expert keeps at most ``capacity = ceil(factor x T x k / E)`` of a micro-batch's ``T`` tokens'
        (token, choice) pairs: those with the highest probabilities (``probs`` policy) or the earliest tokens
        (``position``). A dropped pair's expert becomes ``E`` (the dispatchers send it nowhere; the token keeps its
        other choices and the residual). When CP, or TP under sequence parallelism, splits the micro-batch's
        tokens (``b`` samples here), the ranks that share it decide together, on all its tokens in one process's
        order, so that the same pairs are dropped as in one process. Returns the new experts, the share of the
        micro-batch's pairs dropped and the capacity."""
        group, n = self.topo.token_split
        if n == 1:
            keep, capacity = _keep_within_capacity(self.cfg, experts, probs.detach())
            dropped = (~keep).sum() / keep.numel()
        else:
            positions = self._token_positions(b, experts.shape[0] // b, experts.device)
            every = [gather_values_dim0(t.contiguous(), group) for t in (experts, probs.detach(), positions)]
            order = torch.argsort(every[2])  # one process's order of the micro-batch's tokens
            kept, capacity = _keep_within_capacity(self.cfg, every[0][order], every[1][order])
            everyone = torch.empty_like(kept)
            everyone[order] = kept
            dropped = (~everyone).sum() / everyone.numel()
            mine = dist.get_rank(group) * experts.shape[0]
            keep = everyone[mine:mine + experts.shape[0]]
        return experts.masked_fill(~keep, self.cfg.num_experts), dropped, capacity

    def _token_positions(self, b: int, s_local: int, device) -> torch.Tensor:
        """Where this rank's ``b x s_local`` tokens sit in the micro-batch as one process flattens it
        (sample-major, then sequence position)."""
        topo = self.topo
        sp = topo.tp if topo.sequence_parallel else 1
        seq = s_local * sp * topo.cp
        pos = local_indices(seq, topo.cp, topo.cp_rank, device) if topo.cp > 1 else torch.arange(seq, device=device)
        pos = pos.view(sp, -1)[topo.tp_rank if sp > 1 else 0]  # this TP rank's sequence shard
        return (torch.arange(b, device=device)[:, None] * seq + pos[None, :]).reshape(-1)


def _keep_within_capacity(c, experts: torch.Tensor, probs: torch.Tensor):
    """Which (token, choice) pairs of ``experts`` ``[T, k]`` their experts keep, and the capacity."""
    T, k = experts.shape
    capacity = int(-(-c.moe_expert_capacity_factor * T * k // c.num_experts))
    flat_e, flat_p = experts.reshape(-1), probs.reshape(-1)
    if c.moe_token_drop_policy == "probs":
        rank_key = -flat_p
    else:
        rank_key = torch.arange(flat_e.numel(), device=flat_e.device, dtype=flat_p.dtype)
    order = torch.argsort(rank_key, stable=True)
    order = order[torch.argsort(flat_e[order], stable=True)]  # by expert, best first within each
    counts = torch.bincount(flat_e, minlength=c.num_experts)
    starts = torch.cumsum(counts, 0) - counts
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    return (place < capacity).view(T, k), capacity


class _PaddedToCapacity(nn.Module):
    """``--moe-pad-expert-input-to-capacity``: every local expert's input padded with zero rows to a fixed
    ``rows`` (its capacity times the ranks that send to it), so the expert matmuls always see the same shapes;
    the padding's outputs are dropped again. Numbers are unchanged."""

    def __init__(self, experts: nn.Module, rows: int):
        super().__init__()
        self.experts, self.rows = experts, rows

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n = counts.numel()
        starts = torch.cumsum(counts, 0) - counts
        expert = torch.repeat_interleave(torch.arange(n, device=tokens.device), counts)
        slot = expert * self.rows + torch.arange(tokens.shape[0], device=tokens.device) - starts[expert]
        padded = tokens.new_zeros((n * self.rows, tokens.shape[1])).index_copy(0, slot, tokens)
        return self.experts(padded, torch.full_like(counts, self.rows))[slot]


@torch.no_grad()
def finish_step(model: nn.Module, topo: Topology, rate: float) -> dict:
    """After an optimizer step (every rank calls it): move the expert biases (the aux-loss-free update,
    ``bias += rate * sign(mean load - load)`` from the step's token counts over every rank that routed distinct
    tokens: data parallel, CP, and TP under sequence parallelism), and return the step's MoE metrics as one process
    would report them: aux and z losses summed over layers (each the mean over micro-batches), the load imbalance
    (largest over mean tokens per expert, worst layer) and the share of dropped (token, expert) pairs."""
    stats = model.moe_stats
    layers = {m.layer: m for m in model.modules() if isinstance(m, MoELayer)}
    device = next(model.parameters()).device
    # [aux, z, dropped share, MoE layers] on this stage, summed over data parallelism, then over the stages
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    worst = torch.zeros(1, dtype=torch.float64, device=device)
    for name, module in layers.items():
        row = stats.layers.get(name)
        if row is None:
            continue
        counts = row["counts"].to(device)
        if topo.dp > 1:
            dist.all_reduce(counts, group=topo.dp_group)
        n = row["micro_batches"]
        totals += torch.tensor([float(row["aux_loss"]) / n, float(row["z_loss"]) / n, float(row["dropped"]) / n, 0.0],
                               dtype=torch.float64, device=device)
        totals[3] += 1
        worst = torch.maximum(worst, (counts.max() / counts.mean().clamp_min(1e-9)).view(1))
        if hasattr(module.router, "expert_bias"):
            bias = module.router.expert_bias
            bias.add_(rate * torch.sign(counts.mean() - counts).to(bias.dtype))
    if topo.dp > 1:
        means = totals[:3].clone()
        dist.all_reduce(means, group=topo.dp_group)
        totals[:3] = means / topo.dp
    if topo.pp > 1:
        dist.all_reduce(totals, group=topo.pp_group)
        dist.all_reduce(worst, group=topo.pp_group, op=dist.ReduceOp.MAX)
    stats.reset()
    aux, z, dropped, count = totals.tolist()
    out = {"moe_aux_loss": aux, "moe_load_imbalance": float(worst)}
    if model.cfg.moe_z_loss_coeff:
        out["moe_z_loss"] = z
    if model.cfg.moe_expert_capacity_factor is not None:
        out["moe_dropped_share"] = dropped / max(count, 1.0)
    return out
