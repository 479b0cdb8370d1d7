"""Fault drills: failures caused on purpose, so that the tests and ``bench/bench_faults.py`` can walk every recovery
path through the real entry point. ``MEGALM_FAULTS`` names them; unset (every real run) each hook does nothing.

    MEGALM_FAULTS="nan_grad@5:rank=1;die_save@4:rank=2"

Entries are ``KIND@ITERATION[:rank=R][:arg=X]`` separated by ``;`` (no rank: every rank):
``nan_grad`` a NaN in the first parameter's gradient in that step's backward, ``nan_loss`` a NaN loss (both for
``arg`` steps in a row, default 1);
``spike`` the loss times ``arg`` (default 100); ``slow`` ``arg`` ms (default 200) of extra work in every step
from ITERATION on; ``hang`` the rank sleeps in that step's forward and never arrives; ``die`` SIGKILL in that
step's forward-backward; ``die_save`` SIGKILL once the first file of that iteration's checkpoint is written;
``enospc`` writing that iteration's checkpoint fails with ``ENOSPC``.
"""
from __future__ import annotations

import errno
import os
import signal
import time
from typing import Optional

KINDS = ("nan_grad", "nan_loss", "spike", "slow", "hang", "die", "die_save", "enospc")
ENV = "MEGALM_FAULTS"


class DrillError(ValueError):
    pass


def parse(text: str, rank: int) -> dict:
    """``{kind: (iteration, arg)}`` of the entries for ``rank``."""
    out = {}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        head, *opts = entry.split(":")
        kind, _, when = head.partition("@")
        if kind not in KINDS or not when.isdigit():
            raise DrillError(f"{ENV}: {entry!r}: expected KIND@ITERATION with KIND one of {', '.join(KINDS)}")
        fields = dict(o.split("=", 1) for o in opts if "=" in o)
        if "rank" in fields and int(fields["rank"]) != rank:
            continue
        out[kind] = (int(when), float(fields["arg"]) if "arg" in fields else None)
    return out


class Drills:
    def __init__(self, rank: int, text: Optional[str] = None):
        text = os.environ.get(ENV, "") if text is None else text
        self.faults = parse(text, rank)

    def at(self, kind: str, iteration: int, onward: bool = False, default: float = 1.0) -> Optional[float]:
        """The fault's argument (``default`` without one) when ``kind`` is due at ``iteration`` (or from it on),
        else None."""
        if kind not in self.faults:
            return None
        when, arg = self.faults[kind]
        if iteration == when or (onward and iteration >= when):
            return default if arg is None else arg
        return None

    def _streak(self, kind: str, iteration: int) -> bool:
        if kind not in self.faults:
            return False
        when, arg = self.faults[kind]
        return when <= iteration < when + int(arg or 1)

    def in_step(self, iteration: int, model) -> list:
        """Faults of the step about to run forward and backward; returns hooks to remove after it."""
        if self.at("die", iteration):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.at("hang", iteration):
            while True:
                time.sleep(3600)
        slow = self.at("slow", iteration, onward=True, default=200.0)
        if slow:
            busy = time.perf_counter() + slow / 1000
            while time.perf_counter() < busy:  # work, not sleep: as a slow device keeps its rank busy
                pass
        if self._streak("nan_grad", iteration):
            p = next(p for p in model.parameters() if p.requires_grad)
            return [p.register_hook(lambda g: g * float("nan"))]
        return []

    def loss(self, iteration: int, loss):
        if self._streak("nan_loss", iteration):
            return loss * float("nan")
        factor = self.at("spike", iteration, default=100.0)
        return loss * factor if factor else loss

    def on_file_written(self, iteration: int) -> None:
        if self.at("die_save", iteration):
            os.kill(os.getpid(), signal.SIGKILL)

    def before_write(self, iteration: int, path: str) -> None:
        if self.at("enospc", iteration):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
