"""The resilience section: what a run does when something fails at scale (a rank that hangs or dies, a slow rank,
a step that is not finite or spikes). Each knob has Megatron's name where Megatron has one."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalm.config.fields import ConfigError, opt, positive, positive_if_set


@dataclass
class ResilienceConfig:
    hang_timeout_seconds: float = opt(600.0, "a watchdog on every rank ends the job when a step, a collective or a "
                                      "save has not finished within this many seconds: it prints where each live "
                                      "rank waits, every thread's stack and the ranks that did not arrive, and "
                                      "exits with code 75 (requeue); collectives time out just after it once "
                                      "training runs (0: no watchdog, --distributed-timeout-minutes alone)")
    log_straggler: bool = opt(False, "every --log-interval iterations gather each rank's step and compute time and "
                              "report the slowest ranks against the median (log, metrics, TensorBoard, W&B)")
    straggler_exit_factor: Optional[float] = opt(None, "with --log-straggler: save and stop for a requeue when one "
                                                 "rank's compute time is more than this many times the median for "
                                                 "--straggler-exit-patience reports in a row")
    straggler_exit_patience: int = opt(3, "consecutive straggler reports above --straggler-exit-factor that stop "
                                       "the run")
    check_for_nan_in_loss_and_grad: bool = opt(True, "do not check each rank's loss and gradients (before the "
                                               "data-parallel reduction) for NaN/Inf; a non-finite gradient norm "
                                               "still skips the step, but the rank and tensor go unnamed",
                                               flag="--no-check-for-nan-in-loss-and-grad", negate=True)
    max_skipped_steps: int = opt(10, "after more than this many consecutive skipped steps (non-finite loss or "
                                 "gradient) roll back to the last checkpoint under --save and skip the data "
                                 "since it; without one, stop")
    loss_spike_factor: Optional[float] = opt(None, "a loss above this many times the mean of the last "
                                             "--loss-spike-window steps is not applied: the run rolls back to the "
                                             "last checkpoint and skips the data since it")
    loss_spike_window: int = opt(20, "steps in the running mean --loss-spike-factor compares with (checked once "
                                 "that many are known)")
    max_rollbacks: int = opt(3, "rollbacks a run may make before it stops as diverged")
    iterations_to_skip: list = opt([], "iterations whose batch is consumed without a step (Megatron's flag), e.g. "
                                   "after a spike found by hand", nargs="+")


def validate_resilience(r: ResilienceConfig) -> None:
    if r.hang_timeout_seconds < 0:
        raise ConfigError(f"--hang-timeout-seconds must be >= 0 (0 turns the watchdog off), got "
                          f"{r.hang_timeout_seconds}")
    if r.max_skipped_steps < 0:
        raise ConfigError(f"--max-skipped-steps must be >= 0, got {r.max_skipped_steps}")
    if r.max_rollbacks < 0:
        raise ConfigError(f"--max-rollbacks must be >= 0, got {r.max_rollbacks}")
    positive(r.loss_spike_window, "--loss-spike-window")
    positive(r.straggler_exit_patience, "--straggler-exit-patience")
    positive_if_set([(r.straggler_exit_factor, "--straggler-exit-factor")])
    if r.loss_spike_factor is not None and r.loss_spike_factor <= 1:
        raise ConfigError(f"--loss-spike-factor must be above 1, got {r.loss_spike_factor}")
    if r.straggler_exit_factor is not None and not r.log_straggler:
        raise ConfigError("--straggler-exit-factor needs --log-straggler")
    skip = []
    for item in r.iterations_to_skip:
        text = str(item)
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"--iterations-to-skip {text}: expected iteration numbers from 1")
        skip.append(int(text))
    r.iterations_to_skip = sorted(set(skip))
