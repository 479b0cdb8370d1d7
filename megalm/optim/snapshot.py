"""Host copies of training state for checkpoints.

A synchronous save writes each tensor from where it lives: on the CPU as a zero-copy alias that owns exactly the
tensor's bytes (``torch.save`` writes a view's whole storage, which for a slice of a bucket would be the bucket).
An async save copies this rank's share into ``HostStaging``, memory kept from one save to the next and reserved at
start-up: copying into pages the process has already touched is several times faster than into fresh ones (on the
development machine 1.7 GB took 0.09 s against 0.6 s, the rest being page faults), and on a GPU it is pinned, so
the device-to-host copies run at full speed.
"""
from __future__ import annotations

from typing import Optional

import torch


def alias(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over ``t``'s memory whose storage is exactly ``t``'s bytes (``t`` contiguous)."""
    if t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0 and t.is_contiguous():
        return t
    raw = torch.from_numpy(t.reshape(-1).view(torch.uint8).numpy())  # a new storage over the same memory
    return raw.view(t.dtype).view(t.shape)


class HostStaging:
    """Reusable host memory that an async save's snapshot is copied into, from the start at every save (the
    previous save's writer is done by then); it grows by chunks if the state outgrows what was reserved."""

    CHUNK = 64 << 20

    def __init__(self, pin: bool = False):
        self.pin, self.chunks = pin, []
        self.reset()

    def reset(self) -> None:
        self.chunk, self.offset, self.used = 0, 0, 0  # ``used``: bytes copied since the reset

    def reserve(self, nbytes: int) -> None:
        """Allocate and touch ``nbytes`` up front (start-up), so the first save copies as fast as the next."""
        have = sum(c.numel() for c in self.chunks)
        if nbytes > have:
            self.chunks.append(self._new(nbytes - have))

    def _new(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        size = (t.nbytes + 63) // 64 * 64  # every copy starts 64-byte aligned
        while self.chunk < len(self.chunks) and self.offset + size > self.chunks[self.chunk].numel():
            self.chunk, self.offset = self.chunk + 1, 0
        if self.chunk == len(self.chunks):
            self.chunks.append(self._new(max(size, self.CHUNK)))
        out = self.chunks[self.chunk][self.offset:self.offset + t.nbytes].view(t.dtype).view(t.shape)
        self.offset += size
        self.used += t.nbytes
        out.copy_(t.detach(), non_blocking=self.pin)
        return alias(out)


def host_tensor(t: torch.Tensor, staging: Optional[HostStaging] = None) -> torch.Tensor:
    """``t`` on the host as a compact tensor of its own: copied into ``staging`` (an async save's snapshot), else
    aliased where it lives on the CPU, or copied from the device. Scalars are copied."""
    t = t.detach()
    if t.ndim == 0:
        return t.to("cpu", copy=True)
    if staging is not None:
        return staging.copy(t)
    return alias(t) if t.device.type == "cpu" else t.to("cpu")
