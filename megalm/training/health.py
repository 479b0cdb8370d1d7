"""Whether a step is fit to apply, and whether a rank is slowing the job: the bad-step checks (non-finite loss or
gradient, a loss spike) that every rank agrees on before the optimizer runs, the rule that turns a run of bad
steps into a rollback, and the straggler report (``--log-straggler``).

Every decision comes from all-reduced values, so ranks never disagree on skipping, rolling back or stopping."""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Optional

from megalm.config import ResilienceConfig
from megalm.parallel.state import Topology, host_all_gather

log = logging.getLogger("megalm")


class StepHealth:
    """The bad-step rules of ``ResilienceConfig``: ``verdict`` (before the optimizer: skip this step?) and
    ``after`` (a rollback due?)."""

    def __init__(self, r: ResilienceConfig, topo: Topology):
        self.r, self.topo = r, topo
        self.consecutive = 0
        self.losses = deque(maxlen=r.loss_spike_window)

    def reset(self) -> None:
        self.consecutive = 0
        self.losses.clear()

    def verdict(self, iteration: int, local_loss: float, bad_params: list, loss: float) -> Optional[str]:
        """Why step ``iteration`` must not be applied (the same answer on every rank), or None. ``local_loss``:
        this rank's loss before any reduction (the last stage's; 0 elsewhere); ``bad_params``: names of this
        rank's parameters with a non-finite gradient before reduction; ``loss``: the step's reported loss."""
        mine = [0.0 if math.isfinite(local_loss) else 1.0, 1.0 if bad_params else 0.0]
        if bad_params:  # named here, by the rank that holds them
            log.error("iteration %d: rank %d: non-finite gradient in %s before the data-parallel reduction",
                      iteration, self.topo.rank, ", ".join(bad_params[:4]) + (" ..." if len(bad_params) > 4 else ""))
        if not math.isfinite(local_loss):
            log.error("iteration %d: rank %d: non-finite loss %s", iteration, self.topo.rank, local_loss)
        flags = host_all_gather(mine, self.topo.rank, self.topo.world_size)
        loss_ranks = [r for r, (loss_bad, _) in enumerate(flags) if loss_bad]
        grad_ranks = [r for r, (_, grad_bad) in enumerate(flags) if grad_bad]
        what = []
        if loss_ranks:
            what.append(f"non-finite loss on rank(s) {', '.join(map(str, loss_ranks))}")
        if grad_ranks:
            what.append(f"non-finite gradient on rank(s) {', '.join(map(str, grad_ranks))}")
        if not what and not math.isfinite(loss):
            what.append(f"non-finite loss {loss}")
        if not what and self._spike(loss):
            what.append(f"loss spike: {loss:.4f} is above --loss-spike-factor {self.r.loss_spike_factor:g} x the "
                        f"mean {statistics.fmean(self.losses):.4f} of the last {len(self.losses)} steps")
        return "; ".join(what) or None

    def _spike(self, loss: float) -> bool:
        f = self.r.loss_spike_factor
        return bool(f) and len(self.losses) == self.losses.maxlen and loss > f * statistics.fmean(self.losses)

    def after(self, iteration: int, loss: float, skipped: bool, why: Optional[str]) -> Optional[str]:
        """Count the step; the reason to roll back now, or None."""
        if why and why.startswith("loss spike"):
            return f"iteration {iteration}: {why}"
        if not skipped:
            self.consecutive = 0
            self.losses.append(loss)
            return None
        self.consecutive += 1
        if self.consecutive > self.r.max_skipped_steps:
            return (f"iteration {iteration}: {self.consecutive} consecutive steps skipped (more than "
                    f"--max-skipped-steps {self.r.max_skipped_steps})" + (f", the last for {why}" if why else ""))
        return None


class StragglerMonitor:
    """``--log-straggler``: each rank's compute time (its forward-backward less time blocked on pipeline
    neighbours) and step time, summed over the report's steps, gathered every ``--log-interval`` iterations; the
    slowest ranks against the median, and a stop once one is too slow too often (``--straggler-exit-factor``)."""

    def __init__(self, r: ResilienceConfig, topo: Topology):
        self.r, self.topo = r, topo
        self.compute, self.step, self.steps, self.over = 0.0, 0.0, 0, 0

    def add(self, compute_s: float, step_s: float) -> None:
        self.compute += compute_s
        self.step += step_s
        self.steps += 1

    def report(self, iteration: int) -> tuple:
        """(metrics row, reason to stop or None): a collective, called by every rank at the same iteration."""
        world = self.topo.world_size
        n = max(self.steps, 1)
        values = host_all_gather([1000 * self.compute / n, 1000 * self.step / n], self.topo.rank, world)
        self.compute, self.step, self.steps = 0.0, 0.0, 0
        compute = [c for c, _ in values]
        median = statistics.median(compute)
        order = sorted(range(world), key=lambda r: -compute[r])
        slowest = order[0]
        slowdown = compute[slowest] / median if median > 0 else 1.0
        row = {"iteration": iteration, "straggler_rank": slowest, "straggler_slowdown": slowdown,
               "compute_ms_median": median, "compute_ms_max": compute[slowest], "compute_ms_min": min(compute),
               "step_ms_max": max(s for _, s in values)}
        log.info("stragglers at iteration %d: compute ms per step median %.1f; slowest %s", iteration, median,
                 ", ".join(f"rank {r} {compute[r]:.1f} ({compute[r] / median if median else 1:.2f}x)"
                           for r in order[:3]))
        f = self.r.straggler_exit_factor
        if f is None:
            return row, None
        self.over = self.over + 1 if slowdown > f else 0
        if self.over >= self.r.straggler_exit_patience:
            return row, (f"straggler: rank {slowest} computed {slowdown:.2f}x the median for {self.over} reports "
                         f"(--straggler-exit-factor {f:g}, --straggler-exit-patience "
                         f"{self.r.straggler_exit_patience})")
        return row, None
