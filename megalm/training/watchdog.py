"""Hang detection (``--hang-timeout-seconds``): a thread per rank that ends the job when the loop stops moving.

The loop names what it is doing (``phase``: a step's data, forward-backward, optimizer, a save, validation). The
thread beats: it bumps this rank's counter and records its iteration and phase in the process group's key-value
store (a client connection of its own, with short timeouts, so a stopped store cannot stop it). When one phase has
lasted longer than the timeout, every live rank prints the step and phase it waits in, the collective its main
thread is blocked in (the innermost ``torch.distributed`` call on its stack), every thread's stack, and the ranks
that did not arrive: those whose counter stopped (stopped or dead), those alive but outside any collective while
the others wait in one, and those in another step or phase; then it leaves ``SAVE/requeue_requested`` and exits
with ``REQUEUE_EXIT``, which ``launch/pretrain_gpt.sh`` requeues. The same report of the peers names a dead rank
when a collective fails outright (``pretrain.main``).

Once the first step is done the process groups' own timeout is set just above the watchdog's (torchtitan's
habit): startup (index building, a load) keeps ``--distributed-timeout-minutes``, training never waits the
default 30 minutes."""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import json
import logging
import os
import sys
import threading
import time
import traceback
from typing import Optional

import torch.distributed as dist

from megalm.training.stopping import request_requeue

log = logging.getLogger("megalm")

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again"; launch/pretrain_gpt.sh requeues the job on it


def beat_interval(timeout: float) -> float:
    return max(0.2, min(2.0, timeout / 12))


class Watchdog:
    def __init__(self, timeout: float, rank: int, world_size: int, master: Optional[tuple] = None,
                 save_dir: Optional[str] = None):
        """``master``: (address, port) of the store the process group was formed with (None: one process, no
        peers to report on)."""
        self.timeout, self.rank, self.world_size, self.save_dir = timeout, rank, world_size, save_dir
        self.interval = beat_interval(timeout)
        self.iteration, self.phase_name, self.since = 0, "startup", None  # ``since`` None: not timed
        self.fired = self.leaving = False
        self._frozen = None  # where the main thread was when this rank began to report a failure
        self._store, self._master = None, master
        self._beats, self._stop = 0, threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._main = threading.main_thread().ident
        self.store_error: Optional[str] = None

    # ---- the loop's side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Beat once here (so every rank is known to the store before the loop), then from the thread; every
        moment from now on is timed, between phases too (a collective outside one still counts)."""
        if self.timeout <= 0 or self._thread is not None:
            return
        self.phase_name, self.since = "training loop", time.monotonic()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="megalm-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.since = None

    def reporting(self) -> None:
        """A collective failed: stop timing, but go on beating while this rank names the missing peers."""
        self.since = None
        self._frozen = self._frozen or (True, "a collective that failed")

    def leave(self) -> None:
        """Say in the store that this rank exits after the failure (the ranks still reading do not take it for
        the one that died), then, on rank 0 (the store's host), wait while they read."""
        self._stop.set()
        self.leaving = True
        self._beat()
        if self.rank == 0 and self._master is not None:
            time.sleep(3 * self.interval)

    @contextlib.contextmanager
    def phase(self, name: str, iteration: Optional[int] = None):
        """Time ``name`` against the timeout; phases nest (a save inside a step): the outer one resumes after."""
        outer = (self.phase_name, self.since)
        if iteration is not None:
            self.iteration = iteration
        self.phase_name, self.since = name, time.monotonic()
        yield  # an exception leaves the phase named: the failure report says where it happened
        self.phase_name = outer[0]
        self.since = time.monotonic() if outer[1] is not None else None

    def shorten_collective_timeouts(self) -> None:
        """The process groups' timeout to just above the watchdog's (after the first step; startup keeps the
        flag's). Collectives then fail soon after a hang even if the watchdog thread itself were stuck."""
        if self.timeout <= 0 or not dist.is_initialized():
            return
        timeout = datetime.timedelta(seconds=self.timeout + 4 * self.interval + 10)
        for group in list(getattr(dist.distributed_c10d._world, "pg_map", {})):
            try:
                dist.distributed_c10d._set_pg_timeout(timeout, group)
            except (ValueError, AssertionError, AttributeError):
                pass  # a group of another backend: the watchdog still covers it

    # ---- the thread --------------------------------------------------------------------------------------------

    def _connect(self):
        if self.store_error:  # its host (rank 0's process) is gone: trying again only repeats the timeout
            raise ConnectionError(self.store_error)
        if self._store is None and self._master is not None:
            host, port = self._master
            self._store = dist.TCPStore(host, int(port), self.world_size, is_master=False,
                                        timeout=datetime.timedelta(seconds=max(2.0, 2 * self.interval)),
                                        wait_for_workers=False)
        return self._store

    def _beat(self) -> None:
        self._beats += 1
        try:
            store = self._connect()
            if store is not None:
                waiting, where = self._frozen or self.main_thread_at()
                store.set(f"megalm/beat/{self.rank}", json.dumps([self._beats, self.iteration, self.phase_name,
                                                                  self.leaving, waiting, where]))
        except Exception as exc:  # the store's host (rank 0's process) is stopped or gone
            if not self.store_error:
                self.store_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            self._store = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()
            since = self.since
            if since is not None and time.monotonic() - since > self.timeout:
                self.fire(f"iteration {self.iteration + 1}, {self.phase_name}: no progress for "
                          f"{time.monotonic() - since:.0f} s (--hang-timeout-seconds {self.timeout:g})")

    def peers(self, settle: Optional[float] = None) -> dict:
        """What each other rank last said: ``{rank: (iteration, phase) or None}`` for ranks that beat, and the
        sets ``stalled`` (their counter did not move over ``settle`` seconds: stopped or dead) and ``silent``
        (never beat)."""
        store = None
        try:
            store = self._connect()
        except Exception as exc:
            self.store_error = f"{type(exc).__name__}: {exc}"
        if store is None:
            return {"unreachable": self.store_error}

        def read():
            out = {}
            for r in range(self.world_size):
                key = f"megalm/beat/{r}"
                out[r] = json.loads(store.get(key)) if store.check([key]) else None  # raises: store gone
            return out

        try:
            first = read()
            end = time.monotonic() + (settle if settle is not None else 2.5 * self.interval)
            while time.monotonic() < end:  # beating on: the other ranks may be reading this one's counter now
                time.sleep(min(self.interval, max(0.0, end - time.monotonic())))
                self._beat()
            second = read()
        except Exception as exc:
            self.store_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            return {"unreachable": self.store_error}
        stalled = sorted(r for r in range(self.world_size) if r != self.rank and first[r] is not None
                         and second[r] is not None and second[r][0] == first[r][0] and not second[r][3])
        silent = sorted(r for r in range(self.world_size) if r != self.rank and second[r] is None)
        return {"ranks": {r: tuple(v[1:3]) for r, v in second.items() if v is not None}, "stalled": stalled,
                "silent": silent, "left": sorted(r for r, v in second.items() if v is not None and v[3]),
                "working": {r: v[5] for r, v in second.items() if v is not None and not v[4]}}

    def describe_peers(self, settle: Optional[float] = None) -> str:
        """One line naming the ranks that did not arrive (see ``peers``)."""
        if self._master is None:
            return "no other ranks"
        info = self.peers(settle)
        if "unreachable" in info:
            return (f"the store on rank 0's host does not answer ({info['unreachable']}): rank 0 is stopped or "
                    "dead")
        mine = (self.iteration, self.phase_name)
        alive = [r for r in info["ranks"] if r not in info["stalled"] and r != self.rank]
        elsewhere = sorted(r for r in alive if tuple(info["ranks"][r]) != mine and r not in info["left"])
        outside = sorted(r for r in alive if tuple(info["ranks"][r]) == mine and r in info["working"])
        parts = []
        if info["stalled"]:
            parts.append(f"rank(s) {', '.join(map(str, info['stalled']))} stopped answering (stopped or dead; "
                         "last at " + "; ".join(f"rank {r}: iteration {info['ranks'][r][0] + 1}, "
                                                 f"{info['ranks'][r][1]}" for r in info["stalled"]) + ")")
        if info["silent"]:
            parts.append(f"rank(s) {', '.join(map(str, info['silent']))} never reported")
        if outside:  # alive, in this step and phase, but not waiting in a collective: the ones the others wait for
            parts.append("not in a collective (the others wait for them): " + "; ".join(
                f"rank {r} at {info['working'][r]}" for r in outside))
        if elsewhere:
            parts.append("elsewhere: " + "; ".join(f"rank {r} at iteration {info['ranks'][r][0] + 1}, "
                                                    f"{info['ranks'][r][1]}" for r in elsewhere))
        return "; ".join(parts) or "every other rank is alive and waits too (a collective that never completes)"

    def main_thread_at(self) -> tuple:
        """(whether the main thread waits in a collective, where it is): the innermost ``torch.distributed`` call
        on its stack, e.g. ``all_reduce called from megalm/parallel/state.py:207``, or its innermost frame (an
        asynchronous collective's ``wait()`` counts as waiting)."""
        frame = sys._current_frames().get(self._main)
        if frame is None:
            return False, "unknown"
        stack = traceback.extract_stack(frame)
        calls = [i for i, f in enumerate(stack) if os.sep + "distributed" + os.sep in f.filename
                 and os.sep + "torch" + os.sep in f.filename]
        if not calls:
            last = stack[-1]
            line = (last.line or "").strip()
            return ".wait(" in line, f"{last.name} at {last.filename}:{last.lineno} ({line})"
        first = calls[0]
        caller = stack[first - 1] if first else stack[first]
        name = next((stack[i].name for i in reversed(calls) if not stack[i].name.startswith("_")
                     and stack[i].name not in ("wrapper", "inner")), stack[calls[-1]].name)
        return True, f"{name} called from {caller.filename}:{caller.lineno} ({caller.name})"

    def fire(self, what: str) -> None:
        """Report and exit with ``REQUEUE_EXIT`` (from the watchdog thread: the main thread may be blocked)."""
        self.fired = True
        self._frozen = self.main_thread_at()
        try:
            where = self._frozen[1]
            peers = self.describe_peers()
            message = (f"megalm-pretrain: error: rank {self.rank}: hang detected at {what}; main thread blocked in "
                       f"{where}; {peers}; exiting with code {REQUEUE_EXIT} for a requeue")
            print(message, file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            request_requeue(self.save_dir, f"hang on rank {self.rank}: {what}")
            self.leave()
        finally:
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(REQUEUE_EXIT)
