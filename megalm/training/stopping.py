"""When to stop before ``--train-iters``: a preemption signal (SIGTERM, or SIGUSR1 that Slurm sends with
``--signal=USR1@120``), ``--exit-duration-in-mins`` or ``--exit-interval``. The check runs after every iteration
and is agreed on by all ranks (a signal may reach them at different moments), so every rank stops after the same
iteration, saves and exits 0. A stop before the end leaves ``SAVE/requeue_requested`` for the Slurm launcher.

``TrainingDiverged`` is what the bad-step rules (``health.py``) raise when no rollback can help.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Optional

import torch.distributed as dist

from megalm.parallel.state import host_all_reduce

log = logging.getLogger("megalm")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REQUEUE_MARKER = "requeue_requested"


class TrainingDiverged(RuntimeError):
    pass


class StopConditions:
    def __init__(self, exit_interval: Optional[int], exit_duration_mins: Optional[float]):
        self.exit_interval, self.exit_duration_mins = exit_interval, exit_duration_mins
        self.start = time.monotonic()
        self.received: Optional[int] = None
        self._previous = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: finishing this iteration, then saving and exiting",
                        signal.Signals(signum).name)
        self.received = signum

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after ``iteration`` (the same answer on every rank), or None."""
        codes = [0.0, 0.0, 0.0]
        if self.received is not None:
            codes[0] = float(self.received)
        if self.exit_duration_mins is not None and time.monotonic() - self.start >= 60 * self.exit_duration_mins:
            codes[1] = 1.0
        if self.exit_interval and iteration % self.exit_interval == 0:
            codes[2] = 1.0
        codes = host_all_reduce(codes, op=dist.ReduceOp.MAX)
        if codes[0]:
            return f"signal {signal.Signals(int(codes[0])).name}"
        if codes[1]:
            return f"--exit-duration-in-mins {self.exit_duration_mins} reached"
        if codes[2]:
            return f"--exit-interval {self.exit_interval}"
        return None


def request_requeue(save_dir: Optional[str], reason: str) -> None:
    """``SAVE/requeue_requested``: the launcher requeues the job when it finds it (any rank may write it)."""
    if not save_dir:
        return
    try:
        os.makedirs(save_dir, exist_ok=True)
        with open(os.path.join(save_dir, REQUEUE_MARKER), "w") as fh:
            fh.write(reason + "\n")
    except OSError as exc:
        log.warning("could not leave %s: %s", os.path.join(save_dir, REQUEUE_MARKER), exc)
