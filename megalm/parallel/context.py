"""Context parallelism: each sequence split over the CP ranks, attention across them.

Rank ``r`` of ``CP`` holds chunks ``r`` and ``2 CP - 1 - r`` of the ``2 CP`` equal chunks of every sequence
(Megatron's causal load balance: every rank gets as many early as late queries). Everything outside attention is
per token and runs on the local chunks unchanged; positions are the tokens' own, so RoPE and learned positions see
where each token really is. Attention (``--cp-comm-type``):

- ``allgather``: keys and values are all-gathered (the backward reduce-scatters their gradients) and put back in
  sequence order; the local queries attend with a mask built from the true sequence indices.
- ``a2a`` (Ulysses): an all-to-all trades sequence for heads, so each rank holds the whole sequence for
  ``heads / CP`` heads; ordinary causal (or document) attention runs, and a second all-to-all trades back.
- ``p2p`` (ring): keys and values pass round the ranks while each block is computed (``megalm.parallel.ring``).

The loss is the masked mean over the whole sequence: the trainer sums the token count over the CP group.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from megalm.parallel.experts import _AllToAll
from megalm.parallel.mappings import gather_dim0
from megalm.parallel.ring import RingDocuments, ring_attention


def local_indices(seq_length: int, cp: int, cp_rank: int, device=None) -> torch.Tensor:
    """The sequence positions this rank holds, in its local order: chunks ``r`` and ``2 CP - 1 - r``."""
    c = seq_length // (2 * cp)
    return torch.cat((torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device),
                      torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c, device=device)))


@functools.lru_cache(maxsize=16)
def natural_order(seq_length: int, cp: int, device=None) -> torch.Tensor:
    """The permutation that puts the ranks' local parts, concatenated rank by rank, back in sequence order
    (computed once per shape: every attention layer asks for it; callers only index with it)."""
    gathered = torch.cat([local_indices(seq_length, cp, r, device) for r in range(cp)])
    return torch.argsort(gathered)


def split_batch(batch: dict, cp: int, cp_rank: int) -> dict:
    """This rank's part of a micro-batch: every ``[b, s]`` (or ``[..., b, s]``: multi-token prediction's targets)
    tensor cut to its two chunks, and explicit positions (the tokens' own) when the batch has none."""
    seq = batch["tokens"].shape[1]
    idx = local_indices(seq, cp, cp_rank)
    out = {k: (v[..., idx] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[-1] == seq else v)
           for k, v in batch.items()}
    if "position_ids" not in out:
        out["position_ids"] = idx.expand(batch["tokens"].shape[0], -1)
    return out


def _gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``[b, h, s_local, d]`` from every CP rank, concatenated along the sequence (rank-major)."""
    parts = gather_dim0(x.permute(2, 0, 1, 3).contiguous(), group)  # [cp * s_local, b, h, d]
    return parts.permute(1, 2, 0, 3)


def allgather_keys_values(k: torch.Tensor, v: torch.Tensor, group, order: torch.Tensor):
    """Every rank's keys and values in sequence order."""
    return _gather_sequence(k, group)[:, :, order], _gather_sequence(v, group)[:, :, order]


def _heads_for_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``[b, H, s_local, d]`` -> ``[b, H / CP, CP * s_local, d]``: my share of the heads for every rank's tokens
    (rank-major along the sequence)."""
    cp = dist.get_world_size(group)
    b, heads, s, d = x.shape
    send = x.view(b, cp, heads // cp, s, d).transpose(0, 1).contiguous().view(cp * b, heads // cp, s, d)
    got = _AllToAll.apply(send, [b] * cp, [b] * cp, group)  # [cp (source) * b, H / cp, s, d]
    return got.view(cp, b, heads // cp, s, d).permute(1, 2, 0, 3, 4).reshape(b, heads // cp, cp * s, d)


def _sequence_for_heads(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of ``_heads_for_sequence``."""
    cp = dist.get_world_size(group)
    b, h, total, d = x.shape
    s = total // cp
    send = x.view(b, h, cp, s, d).permute(2, 0, 1, 3, 4).contiguous().view(cp * b, h, s, d)
    got = _AllToAll.apply(send, [b] * cp, [b] * cp, group)  # [cp (source heads) * b, h, s, d]
    return got.view(cp, b, h, s, d).transpose(0, 1).reshape(b, cp * h, s, d)


def a2a_attention(q, k, v, group, order: torch.Tensor, attend):
    """Ulysses: trade sequence for heads, ``attend(q, k, v)`` over the whole sequence in order, trade back."""
    q, k, v = (_heads_for_sequence(t, group)[:, :, order] for t in (q, k, v))
    out = attend(q, k, v)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return _sequence_for_heads(out[:, :, back], group)


def comm_bytes(kind: str, cp: int, micro_batch: int, seq_length: int, heads: int, groups: int, head_dim: int,
               elem_bytes: int, value_dim: Optional[int] = None) -> int:
    """Bytes one rank hands to torch.distributed for one attention layer's forward and backward on one
    micro-batch, counting send buffers (all-gather, all-to-all and reduce-scatter inputs, ring sends); ``heads``
    and ``groups`` per TP rank; ``value_dim`` the values' width when not the keys' (multi-latent attention). With
    ``kv`` this rank's keys and values together and ``q``, ``o`` its queries and attention output:

    - allgather: forward gathers k and v (kv), backward reduce-scatters their gathered gradients (CP kv);
    - a2a: q, k, v and the output are exchanged forward and their gradients backward: 2 (q + o + kv);
    - p2p: the k/v pair goes round CP - 1 hops forward and again backward, its fp32 gradients CP hops (the last
      one home): 2 (CP - 1) kv + CP kv_fp32. Blocks skipped for causality still travel: the ring is fixed.
    """
    local, value_dim = seq_length // cp, value_dim or head_dim
    tokens = micro_batch * local
    kv = tokens * groups * (head_dim + value_dim) * elem_bytes
    if kind == "allgather":
        return kv + cp * kv
    if kind == "a2a":
        return 2 * (tokens * heads * (head_dim + value_dim) * elem_bytes + kv)
    return 2 * (cp - 1) * kv + cp * (kv // elem_bytes * 4)


def context_attention(comm_type: str, q, k, v, topo, mask, attend, sink=None):
    """This rank's queries ``[b, heads, s_local, d]`` against the whole sequence, the ``comm_type`` way; ``mask``
    is what ``attention_mask`` gave for that type, ``attend(q, k, v, mask, positions)`` the model's own attention
    core (``positions``: the queries' places in the sequence). ``sink``: each head's sink logit, which the ring
    applies itself (the other ways' core does)."""
    seq = q.shape[2] * topo.cp
    order = natural_order(seq, topo.cp, q.device)
    if comm_type == "p2p":
        return ring_attention(q, k, v, topo.cp_group, q.shape[-1] ** -0.5, mask, sink)
    if comm_type == "a2a":
        everything = torch.arange(seq, device=q.device)
        return a2a_attention(q, k, v, topo.cp_group, order, lambda *qkv: attend(*qkv, mask, everything))
    k, v = allgather_keys_values(k, v, topo.cp_group, order)
    return attend(q, k, v, mask, local_indices(seq, topo.cp, topo.cp_rank, q.device))


def attention_mask(comm_type: str, seq_local: int, topo, document_ids=None, device=None):
    """What this rank's attention needs to mask under context parallelism: for ``allgather`` a boolean (True: may
    attend) ``[b or 1, 1, s_local, s]`` from the local queries' true positions to all keys in order; for ``a2a``
    None (plain causal over the whole sequence) or, with packed documents, ``[b, 1, s, s]``; for ``p2p`` None or,
    with packed documents, every rank's document ids (the ring builds each block's mask). Built on ``device``, the
    activations' (SDPA refuses a CPU mask with CUDA queries)."""
    cp, seq = topo.cp, seq_local * topo.cp
    device = document_ids.device if document_ids is not None else device
    order = natural_order(seq, cp, device)
    docs = None
    if document_ids is not None:  # every rank's document ids, rank-major
        docs = gather_dim0(document_ids.t().contiguous(), topo.cp_group).t()
        if comm_type == "p2p":
            return RingDocuments(document_ids, docs.view(docs.shape[0], cp, seq_local).transpose(0, 1))
        docs = docs[:, order]  # in sequence order
    if comm_type == "p2p":
        return None
    if comm_type == "a2a":
        if docs is None:
            return None
        same = docs[:, :, None] == docs[:, None, :]
        return (same & torch.ones(seq, seq, dtype=torch.bool, device=docs.device).tril())[:, None]
    queries = local_indices(seq, cp, topo.cp_rank, device)
    causal = torch.arange(seq, device=device)[None, :] <= queries[:, None]  # [s_local, s]
    if docs is None:
        return causal[None, None]
    return ((document_ids[:, :, None] == docs[:, None, :]) & causal)[:, None]
