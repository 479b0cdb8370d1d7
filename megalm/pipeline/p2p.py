"""Point-to-point transfers between neighbouring pipeline stages.

Every message is a hidden-state tensor of one known shape (``[micro batch, sequence (or its sequence-parallel
shard), hidden]``), so no shape is exchanged. All transfers of one schedule step are posted together with
``batch_isend_irecv`` and waited on together. Activations travel with tag 0 and gradients with tag 1: with two
stages the previous and the next rank are the same process, and the tags keep the two streams apart.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from megalm.parallel.state import Topology

ACTIVATION, GRADIENT = 0, 1


class PipeComm:
    def __init__(self, topo: Topology, shape: tuple, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device, self.group = shape, dtype, device, topo.pp_group
        self.next = topo.pp_ranks[(topo.pp_rank + 1) % topo.pp]
        self.prev = topo.pp_ranks[(topo.pp_rank - 1) % topo.pp]
        self.wait_seconds = 0.0  # time blocked in transfers, for the bubble report

    def _buffer(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def communicate(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                    recv_prev: bool = False, recv_next: bool = False):
        """Send activations to the next stage and/or gradients to the previous one, and receive activations
        from the previous stage and/or gradients from the next; returns ``(from_prev, from_next)``."""
        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, self._outgoing(send_next), self.next, self.group, ACTIVATION))
        if recv_prev:
            from_prev = self._buffer()
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev, self.group, ACTIVATION))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, self._outgoing(send_prev), self.prev, self.group, GRADIENT))
        if recv_next:
            from_next = self._buffer()
            ops.append(dist.P2POp(dist.irecv, from_next, self.next, self.group, GRADIENT))
        if ops:
            start = time.perf_counter()
            for req in dist.batch_isend_irecv(ops):
                req.wait()
            self.wait_seconds += time.perf_counter() - start
        if from_prev is not None:
            from_prev.requires_grad_()
        return from_prev, from_next

    def _outgoing(self, t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != self.shape:
            raise RuntimeError(f"pipeline stage output has shape {tuple(t.shape)}, expected {self.shape}")
        return t.detach().to(self.dtype).contiguous()
