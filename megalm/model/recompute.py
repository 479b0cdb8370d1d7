"""Activation recomputation: run a piece of the model without keeping its activations, and again in backward.

Dropout masks must be the same both times: torch's checkpoint restores the default generator, and the contexts
below do the same for the per-TP-rank generator (``RNGTracker``), so recomputation changes no number.
"""
from __future__ import annotations

import contextlib

from torch.utils.checkpoint import checkpoint

from megalm.parallel.random import RNGTracker


def _tracker_contexts(tracker: RNGTracker):
    saved = {}

    @contextlib.contextmanager
    def forward():
        saved["state"] = tracker.state_dict()
        yield

    @contextlib.contextmanager
    def recompute():
        current = tracker.state_dict()
        tracker.load_state_dict(saved["state"])
        try:
            yield
        finally:
            tracker.load_state_dict(current)

    return forward(), recompute()


def recomputed(fn, tracker: RNGTracker, *args):
    """``fn(*args)``, its activations recomputed in backward with the same random numbers."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True,
                      context_fn=lambda: _tracker_contexts(tracker))
