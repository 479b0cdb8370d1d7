"""Where checkpoints lie on disk: ``SAVE/latest_checkpointed_iteration.txt`` naming the current ``iter_*``
directory, pruning old ones, which directories a load may fall back to, and the iterations a rollback skips; and
the errors a checkpoint raises."""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Optional

import torch.distributed as dist

log = logging.getLogger("megalm")

LATEST = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    pass


class CheckpointDamaged(CheckpointError):
    """A file of the checkpoint is missing, truncated or corrupted (a load may fall back to an older one)."""


class SaveFailed(CheckpointError):
    """Writing a checkpoint failed (a full disk): the previous one and the pointer are intact."""


SKIPPED = "skipped_iterations.json"  # iterations a rollback decided to skip, beside the checkpoints


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def prune(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` iteration directories (never the one the pointer names)."""
    iters = sorted(d for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
    try:
        current = pointed_iteration(root)
    except CheckpointError as exc:  # which checkpoint is current is unknown: delete nothing
        log.warning("%s; no old checkpoint removed", exc)
        return
    current = iteration_dir(root, current) if current is not None else None
    for d in iters[:-keep]:
        path = os.path.join(root, d)
        if path != current:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed old checkpoint %s (--keep-last-n %d)", path, keep)


def pointed_iteration(root: str) -> Optional[int]:
    """The iteration ``root``'s pointer names, None without a pointer; a pointer that is not a number stops."""
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer) as fh:
        text = fh.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{pointer}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def resolve(path: str) -> str:
    """``path`` may be a save root (follow its pointer) or an ``iter_*`` directory itself."""
    iteration = pointed_iteration(path)
    if iteration is not None:
        path = iteration_dir(path, iteration)
    if not os.path.exists(os.path.join(path, "meta.json")):
        kind = CheckpointDamaged if iteration is not None else CheckpointError
        raise kind(f"{path}: not a megalm checkpoint (no meta.json, and no {LATEST} pointing to one)")
    return path


def candidates(path: str) -> list:
    """What a load of ``path`` may read, best first: an ``iter_*`` directory itself alone; for a save root the
    iteration its pointer names, that iteration's previous copy (``.old``, left by a re-save cut short), then
    every other iteration directory, newest first (a load falls back along them past damaged ones)."""
    if os.path.exists(os.path.join(path, "meta.json")) or not os.path.isdir(path):
        return [path]
    pointed = pointed_iteration(path)
    found = sorted((int(d[5:]) for d in os.listdir(path) if d.startswith("iter_") and d[5:].isdigit()),
                   reverse=True)
    out = [iteration_dir(path, pointed)] if pointed is not None else []
    if pointed is not None and os.path.isdir(iteration_dir(path, pointed) + ".old"):
        out.append(iteration_dir(path, pointed) + ".old")
    out += [iteration_dir(path, i) for i in found if i != pointed and (pointed is None or i < pointed)]
    return out or [path]


def record_skipped_iterations(root: str, iterations: list, writer: bool) -> None:
    """``SAVE/skipped_iterations.json``: a rollback's skips, kept before the next checkpoint holds them."""
    if writer:
        tmp = os.path.join(root, SKIPPED + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(iterations, fh)
        os.replace(tmp, os.path.join(root, SKIPPED))
    if dist.is_initialized():
        dist.barrier()


def skipped_iterations(root: str) -> list:
    where = os.path.join(root, SKIPPED)
    if not os.path.exists(where):
        return []
    try:
        with open(where) as fh:
            value = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{where}: unreadable ({exc})") from None
    if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
        raise CheckpointError(f"{where}: expected a list of iteration numbers")
    return value
