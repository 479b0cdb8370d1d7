"""Where a step's time goes (``--timing-log-level``, Megatron's flag): data, forward-backward (pipeline waits
included; ``pipeline_wait_ms`` says how much), gradient reduction left after backward, the optimizer, and the time
a checkpoint save blocked the loop (reported with the iteration after the save). Level 0 costs nothing; level 2
synchronises the device at every boundary, so GPU phases are attributed exactly, at some cost in speed."""
from __future__ import annotations

import contextlib
import time

import torch


class Timers:
    def __init__(self, level: int, device: torch.device):
        self.level, self.device = level, device
        self.seconds = {}

    def _sync(self) -> None:
        if self.level >= 2 and self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.level:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def take(self) -> dict:
        """The phases timed since the last call, as ``time_<phase>_ms`` metrics (empty at level 0)."""
        out = {f"time_{name.replace('-', '_')}_ms": 1000 * s for name, s in self.seconds.items()}
        self.seconds = {}
        return out
