"""Checkpoints in global coordinates: full (unsharded, unpadded) tensors keyed by parameter name.

On disk, Megatron's habit: ``SAVE/latest_checkpointed_iteration.txt`` and ``SAVE/iter_0000500/`` holding
``model.pt``, ``optimizer.pt``, ``rng.pt``, ``config.yaml`` and ``meta.json`` (iteration, consumed samples and a
SHA-256 of every file). A save is written to a temporary directory, fsynced and renamed before the pointer moves,
so a crash mid-save leaves the previous checkpoint and the pointer intact. Tensors load with ``weights_only=True``.
Because tensors are whole and keyed by global names, a checkpoint loads under any tensor- or pipeline-parallel
layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from megalm.config import Config, load_yaml, save_yaml
from megalm.parallel.state import Topology

log = logging.getLogger("megalm")

LATEST = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _gather_full(t: torch.Tensor, tp_dim: Optional[int], topo: Topology) -> torch.Tensor:
    if tp_dim is None or topo.tp == 1:
        return t.detach().cpu().clone()
    parts = [torch.empty_like(t) for _ in range(topo.tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=topo.tp_group)
    return torch.cat(parts, dim=tp_dim).cpu()


def _shard(full: torch.Tensor, tp_dim: Optional[int], topo: Topology) -> torch.Tensor:
    if tp_dim is None or topo.tp == 1:
        return full
    return full.chunk(topo.tp, dim=tp_dim)[topo.tp_rank]


def _unpad(full, param, vocab_size):
    return full[:vocab_size] if getattr(param, "padded_rows", False) else full


def _pad(full, param, topo):
    if not getattr(param, "padded_rows", False):
        return full
    rows = param.shape[0] * (topo.tp if getattr(param, "tp_dim", None) == 0 else 1)
    out = full.new_zeros((rows,) + tuple(full.shape[1:]))
    out[: full.shape[0]] = full
    return out


def _owned(model):
    """This stage's parameters, less the last stage's copy of a tied embedding (the first stage saves it)."""
    return [(name, p) for name, p in model.named_parameters() if not getattr(p, "tied_copy", False)]


def model_state(model, topo: Topology) -> dict:
    """Full, unpadded tensors of this stage's parameters (a collective over the TP group)."""
    return {name: _unpad(_gather_full(p, getattr(p, "tp_dim", None), topo), p, model.vocab_size)
            for name, p in _owned(model)}


def optimizer_state(model, full_state: dict, topo: Topology) -> dict:
    """Adam moments in global coordinates, keyed like the model, plus the step counts. ``full_state`` maps a
    parameter to its moments with this TP rank's whole tensors (``DistributedOptimizer.full_state``)."""
    out = {}
    for name, p in _owned(model):
        state = full_state.get(p)
        if not state:
            continue
        out[name] = {k: (_unpad(_gather_full(v, getattr(p, "tp_dim", None), topo), p, model.vocab_size)
                         if torch.is_tensor(v) and v.shape == p.shape else v.detach().cpu().clone())
                     for k, v in state.items()}
    return out


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _merge_stages(state: dict, topo: Topology) -> dict:
    """Rank 0 receives every pipeline stage's part (from the first TP and DP rank of each stage)."""
    if topo.pp == 1:
        return state
    mine = state if topo.tp_rank == 0 and topo.dp_rank == 0 else None
    parts = [None] * topo.world_size if topo.rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in (parts or []) if part for k, v in part.items()}


def save_checkpoint(root: str, iteration: int, model, optimizer_full_state: dict, cfg: Config, topo: Topology,
                    meta: dict, rng: dict) -> Optional[str]:
    """Every rank calls this (the gathers are collectives); global rank 0 writes."""
    tensors = {"model.pt": _merge_stages(model_state(model, topo), topo),
               "optimizer.pt": _merge_stages(optimizer_state(model, optimizer_full_state, topo), topo), "rng.pt": rng}
    final = iteration_dir(root, iteration)
    if topo.rank == 0:
        os.makedirs(root, exist_ok=True)
        tmp = final + f".tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for fname, obj in tensors.items():
            torch.save(obj, os.path.join(tmp, fname))
        save_yaml(cfg, os.path.join(tmp, "config.yaml"))
        files = sorted(os.listdir(tmp))
        meta = dict(meta, iteration=iteration, checksums={f: _sha256(os.path.join(tmp, f)) for f in files})
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        for f in os.listdir(tmp):
            _fsync_file(os.path.join(tmp, f))
        if os.path.exists(final):  # re-saving an iteration: move the old one aside first
            old = final + f".old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        pointer_tmp = os.path.join(root, LATEST + ".tmp")
        with open(pointer_tmp, "w") as fh:
            fh.write(str(iteration))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(pointer_tmp, os.path.join(root, LATEST))
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info("saved checkpoint %s", final)
    if dist.is_initialized():
        dist.barrier()
    return final


def prune(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` iteration directories (never the one the pointer names)."""
    iters = sorted(d for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())
    pointer = os.path.join(root, LATEST)
    current = iteration_dir(root, int(open(pointer).read().strip())) if os.path.exists(pointer) else None
    for d in iters[:-keep]:
        path = os.path.join(root, d)
        if path != current:
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed old checkpoint %s (--keep-last-n %d)", path, keep)


def resolve(path: str) -> str:
    """``path`` may be a save root (follow its pointer) or an ``iter_*`` directory itself."""
    pointer = os.path.join(path, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as fh:
            text = fh.read().strip()
        if not text.isdigit():
            raise CheckpointError(f"{pointer}: expected an iteration number, found {text[:40]!r}")
        path = iteration_dir(path, int(text))
    if not os.path.exists(os.path.join(path, "meta.json")):
        raise CheckpointError(f"{path}: not a megalm checkpoint (no meta.json, and no {LATEST} pointing to one)")
    return path


def read_checkpoint(path: str, parts=("model", "optimizer", "rng")) -> dict:
    """Meta, config and the tensors of ``parts`` of a checkpoint, each file read checked against its SHA-256."""
    path = resolve(path)
    with open(os.path.join(path, "meta.json")) as fh:
        meta = json.load(fh)
    wanted = {"config.yaml"} | {f"{part}.pt" for part in parts}
    for fname, digest in meta["checksums"].items():
        if fname not in wanted:
            continue
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise CheckpointError(f"{fpath}: missing from the checkpoint")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"{fpath}: checksum mismatch, the file is corrupted")
    out = {"path": path, "meta": meta, "config": load_yaml(os.path.join(path, "config.yaml"))}
    for part in parts:
        out[part] = torch.load(os.path.join(path, f"{part}.pt"), map_location="cpu", weights_only=True)
    return out


@torch.no_grad()
def load_model_state(model, state: dict, topo: Topology, source: str) -> None:
    names = dict(model.named_parameters())
    missing = sorted(set(names) - set(state))
    # under pipeline parallelism the other stages' parameters are expected
    unexpected = sorted(set(state) - set(names)) if topo.pp == 1 else []
    if missing or unexpected:
        raise CheckpointError(f"{source}: parameters do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); is the model config the same?")
    for name, p in names.items():
        full = _pad(state[name], p, topo)
        shard = _shard(full, getattr(p, "tp_dim", None), topo)
        if shard.shape != p.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(state[name].shape)} in the checkpoint, "
                                  f"which does not fit {tuple(p.shape)} here; is the model config the same?")
        p.copy_(shard)


def load_optimizer_state(model, state: dict, topo: Topology) -> dict:
    """{parameter: moments with this TP rank's whole tensors} from the checkpoint's global ones."""
    return {p: {k: (_shard(_pad(v, p, topo), getattr(p, "tp_dim", None), topo).to(p.device).clone()
                    if v.ndim > 0 else v.clone())
                for k, v in state[name].items()}
            for name, p in model.named_parameters() if name in state}
