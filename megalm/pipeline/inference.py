"""One forward pass through every pipeline stage, for decoding (no micro-batches, no backward).

Each rank runs its chunks in order, receiving hidden states from the previous stage and sending its output on
(with virtual stages the activations go round the ring of ranks once per chunk); the last stage returns the
logits. Tokens chosen there are then broadcast over the pipeline group so every stage feeds the same next step.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megalm.pipeline.p2p import PipeComm


def last_position_logits(model, tokens: torch.Tensor, position_ids=None, kv_cache=None) -> Optional[torch.Tensor]:
    """``[b, vocab]`` logits of the last position on the last pipeline stage; None on the others."""
    topo = model.topo
    if topo.pp == 1:
        return model(tokens, position_ids=position_ids, kv_cache=kv_cache)[:, -1]
    param = next(model.parameters())
    comm = PipeComm(topo, (tokens.shape[0], tokens.shape[1], model.cfg.hidden_size), param.dtype, param.device)
    hidden = out = None
    for chunk in range(len(model.chunks)):
        if not model.is_first_chunk(chunk):
            hidden, _ = comm.communicate(recv_prev=True)
        out = model(tokens, position_ids=position_ids, kv_cache=kv_cache, hidden=hidden, chunk=chunk)
        if not model.is_last_chunk(chunk):
            comm.communicate(send_next=out)
    return out[:, -1] if topo.is_last_stage else None


def from_last_stage(tensor: Optional[torch.Tensor], like: torch.Tensor, topo) -> torch.Tensor:
    """The last stage's ``tensor`` on every stage (``like`` gives the shape and dtype elsewhere)."""
    if topo.pp == 1:
        return tensor
    if tensor is None:
        tensor = torch.empty_like(like)
    dist.broadcast(tensor, src=topo.pp_ranks[-1], group=topo.pp_group)
    return tensor
