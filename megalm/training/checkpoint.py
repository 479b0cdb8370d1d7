"""Checkpoints in global coordinates: every tensor is written once, by a rank that holds it (the first data-parallel
replica for the dense model; the first expert-data-parallel rank for each MoE expert shard), keyed by global
parameter name, with its place in the whole tensor recorded in the metadata.

On disk, Megatron's habit: ``SAVE/latest_checkpointed_iteration.txt`` and ``SAVE/iter_0000500/`` holding
``model-tpXX-ppYYY.pt`` and ``optimizer-tpXX-ppYYY.pt`` per (TP, PP) rank (ranks beyond the first replica add
``-dpZZZZZ`` files with their experts; under ZeRO every rank writes its own slice of the parameters and of the
Adam state, nothing is gathered, and the index records each slice's range of the flattened tensor and the
tensor's place),
``rng-tpXX-ppYYY-dpZZZZZ.pt`` from every rank (each rank's random streams differ: pipeline stages draw different
amounts, the TP tracker is seeded per TP rank), ``config.yaml``, ``meta.json`` (iteration, consumed samples, the
shard index and a SHA-256 of every file) and, on the DeepSpeed path, the engine's own state under
``deepspeed/``. A save is written to a temporary directory, fsynced and renamed before the pointer moves, so a
crash mid-save leaves the previous checkpoint and the pointer intact. Tensors load with ``weights_only=True``
(memory-mapped). Reading assembles whole tensors, or for a training rank only its own part of each from the saved
pieces that overlap it, so a checkpoint loads under any TP / PP / DP / EP / ZeRO layout without a conversion step.
bf16/fp16 runs save their parameters in that dtype and the fp32 main parameters with the Adam state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from typing import Callable, Optional

import torch
import torch.distributed as dist
import yaml

from megalm.config import Config, ConfigError, load_yaml, save_yaml
from megalm.optim.snapshot import HostStaging, host_tensor
from megalm.parallel.fsdp import copy_into
from megalm.parallel.layers import shard_of
from megalm.parallel.state import Topology, host_all_gather, host_all_reduce
from megalm.training.checkpoint_dirs import (LATEST, CheckpointDamaged, CheckpointError, SaveFailed, iteration_dir,
                                            pointed_iteration, resolve)
from megalm.training.drills import Drills

log = logging.getLogger("megalm")

FORMAT = 2  # 2: ZeRO-sliced Adam state written by every rank (``optimizer_slices``); 1 (no key): gathered first

# model fields that may differ between the run that saved a checkpoint and the one that loads it
RUNTIME_MODEL_FIELDS = {"attention_backend", "hidden_dropout", "attention_dropout", "seq_length",
                        "recompute_granularity", "recompute_method", "recompute_num_layers",
                        "moe_token_dispatcher_type", "moe_grouped_gemm", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                        "moe_router_load_balancing_type", "moe_router_bias_update_rate",
                        "moe_expert_capacity_factor", "moe_token_drop_policy", "moe_pad_expert_input_to_capacity"}


def check_same_model(saved, here, path: str) -> None:
    """A CheckpointError naming every field in which the checkpoint's model config (``saved``) differs from
    ``here`` (runtime settings aside)."""
    saved, here = saved.__dict__, here.__dict__
    differ = sorted(k for k in here if k not in RUNTIME_MODEL_FIELDS and saved.get(k) != here[k])
    if differ:
        raise CheckpointError(f"{path}: model config differs from this run in "
                              + ", ".join(f"{k} ({saved.get(k)} there, {here[k]} here)" for k in differ))


def _pad(full, param, topo):
    if not getattr(param, "padded_rows", False):
        return full
    rows = param.shape[0] * (topo.tp if getattr(param, "tp_dim", None) == 0 else 1)
    out = full.new_zeros((rows,) + tuple(full.shape[1:]))
    out[: full.shape[0]] = full
    return out


def _owned(model):
    """This stage's parameters, less the last stage's copy of a tied embedding (the first stage saves it); of a
    model with LoRA adapters, the adapters alone (the base is another checkpoint's)."""
    owned = [(name, p) for name, p in model.named_parameters() if not getattr(p, "tied_copy", False)]
    adapters = [(name, p) for name, p in owned if getattr(p, "lora", False)]
    return adapters or owned


def _shard_files(topo: Topology) -> tuple:
    """This rank's file names: the first data-parallel (and context-parallel) replica's are named by (TP, PP)
    rank alone (as before experts); other ranks write only experts, in files that also name their DP (CP) rank."""
    suffix = f"tp{topo.tp_rank:02d}-pp{topo.pp_rank:03d}" + (f"-dp{topo.dp_rank:05d}" if topo.dp_rank else "") \
        + (f"-cp{topo.cp_rank:02d}" if topo.cp_rank else "")
    return f"model-{suffix}.pt", f"optimizer-{suffix}.pt"


def _writes(p, topo: Topology, every_replica: bool = False) -> bool:
    """Whether this rank writes ``p``, so that every tensor is written once. Experts: the first
    expert-data-parallel rank holding them. Others: the first data-parallel replica, and of its TP ranks only
    rank 0 for a replicated tensor. ``every_replica``: ZeRO slices, of which each data-parallel (and
    expert-data-parallel) rank holds its own, so only the TP rule remains."""
    if getattr(p, "expert", False):
        return every_replica or topo.edp_rank == 0
    first_replica = every_replica or (topo.dp_rank == 0 and topo.cp_rank == 0)
    return first_replica and (topo.tp_rank == 0 or (topo.tp > 1 and getattr(p, "tp_dim", None) is not None))


def _place(p, topo: Topology) -> list:
    """This rank's part in the global tensor as ``[dim, start, stop]`` splits: ``[[None, 0, rows]]`` for the
    whole tensor, one split for a TP shard or experts split over EP, two for experts also split over ETP."""
    if getattr(p, "expert", False):
        splits = [(0, topo.ep, topo.ep_rank), (p.etp_dim, topo.etp, topo.etp_rank)]
    else:
        splits = [(getattr(p, "tp_dim", None), topo.tp, topo.tp_rank)]
    out = [[dim, index * p.shape[dim], (index + 1) * p.shape[dim]] for dim, size, index in splits
           if dim is not None and size > 1]
    return out or [[None, 0, p.shape[0] if p.ndim else 1]]


def _rng_file(tp_rank: int, pp_rank: int, dp_rank: int, cp_rank: int = 0) -> str:
    return f"rng-tp{tp_rank:02d}-pp{pp_rank:03d}-dp{dp_rank:05d}" + (f"-cp{cp_rank:02d}" if cp_rank else "") + ".pt"


def _files(root: str) -> list:
    """Every file below ``root``, as paths relative to it (the DeepSpeed engine writes a folder of its own)."""
    out = []
    for folder, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(folder, n), root) for n in names]
    return sorted(out)


def local_shards(model, optimizer_state, topo: Topology, staging: Optional[HostStaging] = None) -> tuple:
    """This rank's parameters and Adam state as written, and their place in the global tensors:
    ``(model, optimizer, index, slices)`` with ``index[name] = [dim, start, stop, padded_rows, (dim, start,
    stop)...]`` (``dim`` None for a whole tensor; more splits follow for experts split two ways) for what
    ``_writes`` gives this rank. ``optimizer_state`` is ``(whole, slices)`` (``DistributedOptimizer.
    checkpoint_state``): a parameter in a ZeRO-sliced bucket is written, values and Adam state, by every rank that
    holds a slice of it (fully parallel, nothing gathered): ``slices[name] = [[start, stop, local_shape, *index
    entry]]`` per piece of the flattened TP-local tensor, its values under ``model`` and moments under
    ``optimizer`` as lists in the same order. Parameters are copied into ``staging`` (an async save's snapshot),
    else written from where they live."""
    whole, pieces = optimizer_state if isinstance(optimizer_state, tuple) else (optimizer_state or {}, {})
    tensors, moments, index, slices = {}, {}, {}, {}
    for name, p in _owned(model):
        first, *more = _place(p, topo)
        place = [*first, bool(getattr(p, "padded_rows", False))] + [x for split in more for x in split]
        if p in pieces:
            if _writes(p, topo, every_replica=True):
                slices[name] = [[a, b, list(p.shape), *place] for a, b, _ in pieces[p]]
                tensors[name] = [m["param"] for _, _, m in pieces[p]]
                moments[name] = [{k: v for k, v in m.items() if k != "param"} for _, _, m in pieces[p]]
            continue
        if not _writes(p, topo):
            continue
        index[name] = place
        tensors[name] = host_tensor(p, staging)
        if whole.get(p):
            moments[name] = whole[p]  # host copies already (``checkpoint_state``)
    return tensors, moments, index, slices


def _fsync_file(path: str) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(root: str, iteration: int, model, optimizer_state, cfg: Config, topo: Topology,
                    meta: dict, rng: dict, write_extra: Optional[Callable[[str], None]] = None,
                    staging: Optional[HostStaging] = None):
    """Every rank calls this. Every rank writes its RNG state; the first data-parallel replica writes each of its
    ranks' shard files (``model-tpXX-ppYYY.pt``, ``optimizer-...``), in global coordinates; ``write_extra(tmp)``,
    called on every rank, adds what else belongs to the iteration (the DeepSpeed engine's state); then rank 0 adds
    config and metadata (the shard index and a SHA-256 per file), renames the directory and moves the pointer.

    With ``staging`` (``--async-save``; ``optimizer_state`` copied into it too) the caller waits only for the host
    copy of this rank's share: the files are written and checksummed by a thread, and the returned ``PendingSave``
    makes the checkpoint visible (``finish``, a collective) once every rank's thread is done. Otherwise returns
    the checkpoint's path."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if topo.rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    if write_extra is not None:
        write_extra(tmp)
    tensors, moments, index, slices = local_shards(model, optimizer_state, topo, staging)
    if staging is not None and staging.pin:
        torch.cuda.synchronize()  # the device-to-host copies are done before training goes on
    files = {_rng_file(topo.tp_rank, topo.pp_rank, topo.dp_rank, topo.cp_rank): rng}
    model_file, optim_file = _shard_files(topo)
    if tensors:
        files[model_file] = tensors
    if moments:
        files[optim_file] = moments
    index = {"model": {n: [model_file, *e] for n, e in index.items()},
             "optimizer": {n: [optim_file, *index[n]] for n in moments if n not in slices},
             "model_slices": {n: [[model_file, i, *e] for i, e in enumerate(pieces)] for n, pieces in slices.items()},
             "optimizer_slices": {n: [[optim_file, i, *e] for i, e in enumerate(pieces)]
                                  for n, pieces in slices.items()}}
    pending = PendingSave(root, iteration, tmp, cfg, topo, dict(meta, vocab_size=model.vocab_size), index, files)
    if staging is not None:
        pending.start()
        return pending
    pending.write()
    return pending.finish()


class PendingSave:
    """One rank's share of a checkpoint being written: ``write`` (in a thread under ``--async-save``) saves and
    checksums this rank's files in the temporary directory; ``finish`` (every rank) gathers the shard index and
    checksums to rank 0, which writes config and metadata and makes the iteration visible atomically."""

    def __init__(self, root, iteration, tmp, cfg, topo, meta, index, files):
        self.root, self.iteration, self.tmp, self.cfg, self.topo = root, iteration, tmp, cfg, topo
        self.meta, self.index, self.files = meta, index, files
        self.checksums, self.error, self.thread, self.seconds = {}, None, None, 0.0

    def write(self) -> None:
        import time

        start = time.perf_counter()
        drills = Drills(self.topo.rank)
        try:
            for fname, obj in self.files.items():
                path = os.path.join(self.tmp, fname)
                drills.before_write(self.iteration, path)
                torch.save(obj, path)
                _fsync_file(path)
                self.checksums[fname] = _sha256(path)
                drills.on_file_written(self.iteration)
        except Exception as exc:  # reported to every rank by ``finish``
            self.error = f"{type(exc).__name__}: {exc}"
        self.files = None  # the host copies go as soon as they are on disk
        self.seconds = time.perf_counter() - start

    def start(self) -> None:
        import threading

        self.thread = threading.Thread(target=self.write, name=f"megalm-save-{self.iteration}", daemon=True)
        self.thread.start()

    def done_everywhere(self) -> bool:
        """Whether every rank's files are written (a collective: all ranks ask at the same point)."""
        busy = self.thread is not None and self.thread.is_alive()
        return bool(host_all_reduce([0.0 if busy else 1.0], op=dist.ReduceOp.MIN)[0])

    def finish(self) -> str:
        if self.thread is not None:
            self.thread.join()
        flags = host_all_gather([1.0 if self.error else 0.0], self.topo.rank, self.topo.world_size)
        failed = [r for r, (f,) in enumerate(flags) if f]
        if failed:
            if self.topo.rank == 0:  # the space the partial files hold goes back at once
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise SaveFailed(f"{self.tmp}: writing the checkpoint of iteration {self.iteration} failed on rank(s) "
                             f"{', '.join(map(str, failed))}" + (f" ({self.error})" if self.error else "")
                             + f"; the previous checkpoint{self._previous()} and the pointer are intact")
        parts = [None] * self.topo.world_size if self.topo.rank == 0 else None
        mine = (self.index, self.checksums)
        if dist.is_initialized():
            dist.gather_object(mine, parts, dst=0)
        else:
            parts = [mine]
        final = iteration_dir(self.root, self.iteration)
        if self.topo.rank == 0:
            self._publish(parts, final)
        if dist.is_initialized():
            dist.barrier()
        return final

    def _previous(self) -> str:
        try:
            iteration = pointed_iteration(self.root)
        except CheckpointError:
            return ""
        return f" ({iteration_dir(self.root, iteration)})" if iteration is not None else ""

    def _publish(self, parts: list, final: str) -> None:
        shards, checksums = {"model": {}, "optimizer": {}, "model_slices": {}, "optimizer_slices": {}}, {}
        for index, sums in parts:
            checksums.update(sums)
            for kind in shards:
                for name, entry in (index or {}).get(kind, {}).items():
                    if kind.endswith("_slices"):
                        shards[kind].setdefault(name, []).extend(entry)
                    else:
                        shards[kind].setdefault(name, []).append(entry)
        save_yaml(self.cfg, os.path.join(self.tmp, "config.yaml"))
        for f in _files(self.tmp):  # what write_extra added (the DeepSpeed engine's files) and the config
            if f not in checksums:
                checksums[f] = _sha256(os.path.join(self.tmp, f))
        meta = dict(self.meta, format=FORMAT, iteration=self.iteration, shards=shards, checksums=checksums)
        with open(os.path.join(self.tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
        for f in ("config.yaml", "meta.json"):
            _fsync_file(os.path.join(self.tmp, f))
        old = final + ".old"
        if os.path.exists(final):  # re-saving an iteration: the old copy stays (as .old) until the new one is in
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(self.tmp, final)
        pointer_tmp = os.path.join(self.root, LATEST + ".tmp")
        with open(pointer_tmp, "w") as fh:
            fh.write(str(self.iteration))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(pointer_tmp, os.path.join(self.root, LATEST))
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        shutil.rmtree(old, ignore_errors=True)
        log.info("saved checkpoint %s (rank 0 wrote %.1f MB in %.2f s%s)", final,
                 sum(os.path.getsize(os.path.join(final, f)) for f in self.checksums) / 1e6, self.seconds,
                 ", in the background" if self.thread is not None else "")


def _read_meta(path: str) -> dict:
    """``meta.json``, checked for what a load needs before anything else is read."""
    where = os.path.join(path, "meta.json")
    try:
        with open(where) as fh:
            meta = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointDamaged(f"{where}: unreadable ({exc}); the checkpoint is damaged") from None
    shapes = {"checksums": dict, "shards": dict, "iteration": int}
    missing = [k for k, kind in shapes.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if missing:
        raise CheckpointDamaged(f"{where}: lacks {', '.join(missing)}; the checkpoint is damaged")
    return meta


def _verified(path: str, meta: dict, names) -> None:
    for fname in sorted(names):
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise CheckpointDamaged(f"{fpath}: missing from the checkpoint")
        if fname not in meta["checksums"]:
            raise CheckpointDamaged(f"{fpath}: meta.json records no checksum for it, so it cannot be verified")
        if _sha256(fpath) != meta["checksums"][fname]:
            raise CheckpointDamaged(f"{fpath}: checksum mismatch, the file is truncated or corrupted")


def read_checkpoint(path: str, parts=("model", "optimizer"), model=None, topo: Optional[Topology] = None) -> dict:
    """Meta, config and ``parts`` (model, optimizer) of a checkpoint as whole, unpadded tensors keyed by global
    name (the shards assembled, memory-mapped while reading); every file read is checked against its SHA-256
    first. Random-number state is per rank: ``read_rng``.

    With ``model`` and ``topo`` (a training rank loading): only ``model``'s parameters, each as this rank's part
    (its TP / EP shard, padding rows zero; ``out["local"]`` is True). Only the files holding them are checksummed
    and opened, and of those only the pieces overlapping this rank's part are read, so under pipeline
    parallelism a rank reads its stage's files alone, and a TP rank's shard comes from the saved shards that
    overlap it."""
    path = resolve(path)
    meta = _read_meta(path)
    params = dict(model.named_parameters()) if model is not None else None
    out = {"path": path, "meta": meta, "local": params is not None}
    vocab = meta.get("vocab_size")
    wanted = {part: {} for part in parts}  # part -> name -> (entries, sliced)
    for part in parts:
        for kind, sliced in ((part, False), (f"{part}_slices", True)):
            for name, entries in meta["shards"].get(kind, {}).items():
                if params is None or name in params:
                    wanted[part][name] = (entries, sliced)
    names = {e[0] for part in parts for entries, _ in wanted[part].values() for e in entries}
    _verified(path, meta, {"config.yaml"} | names)
    try:
        out["config"] = load_yaml(os.path.join(path, "config.yaml"))
    except (ConfigError, yaml.YAMLError) as exc:
        raise CheckpointError(f"{os.path.join(path, 'config.yaml')}: not a megalm config ({exc})") from None
    files = {f: torch.load(os.path.join(path, f), map_location="cpu", weights_only=True, mmap=True) for f in names}
    for part in parts:
        out[part] = {}
        for name, (entries, sliced) in wanted[part].items():
            try:
                _read_tensor(out, part, name, entries, sliced, files, vocab,
                             (params[name], topo) if params is not None else None)
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {part} tensor {name}: {exc}") from None
    return out


def _read_tensor(out: dict, part: str, name: str, entries: list, sliced: bool, files: dict, vocab, target) -> None:
    """One tensor of ``part`` (whole, or ``target``'s part) into ``out[part][name]``, from its index entries."""
    if sliced:
        first = files[entries[0][0]][name][entries[0][1]]
        keys = {"": lambda piece: piece} if part == "model" else \
            {k: (lambda piece, k=k: piece[k]) for k in ("exp_avg", "exp_avg_sq", "main_param") if k in first}
        joined = _join_slices(name, entries, files, vocab, keys, target)
        out[part][name] = joined[""] if part == "model" else dict(joined, step=first["step"].clone())
        return
    entries = sorted(entries, key=lambda e: e[2:4] + e[6:8])
    if part == "model":
        out[part][name] = _join([files[e[0]][name] for e in entries], entries, vocab, target)
    else:
        first = files[entries[0][0]][name]
        out[part][name] = {k: (_join([files[e[0]][name][k] for e in entries], entries, vocab, target)
                               if v.ndim > 0 else v.clone()) for k, v in first.items()}


def _join_slices(name: str, entries: list, files: dict, vocab, keys: dict, target=None) -> dict:
    """Whole tensors (or ``target``'s part, as in ``_join``) from ZeRO slices: each entry ``[file, i, start, stop,
    local_shape, *place]`` is a range of a flattened TP-local tensor whose place in the whole is ``place`` (as in
    ``_join``); ``keys`` maps each output to how it is read from a stored piece. Saved TP-local tensors that do
    not overlap ``target`` are not read."""
    want = _box(_place(*target)) if target is not None else None
    locals_, covered = {}, {}
    for file, i, start, stop, shape, *place in entries:
        if want is not None and _overlap(want, _box(_entry_box(place)), shape, target[0].shape, vocab,
                                         place[3]) is None:
            continue
        piece = files[file][name][i]
        key = json.dumps(place)
        if key not in locals_:
            locals_[key] = (place, shape, {k: None for k in keys})
        for k, read in keys.items():
            values = read(piece).reshape(-1)
            flat = locals_[key][2][k]
            if flat is None:
                flat = locals_[key][2][k] = values.new_zeros(int(torch.Size(shape).numel()))
            flat[start:stop] = values
        covered[key] = covered.get(key, 0) + (stop - start)
    for key, (_, shape, _) in locals_.items():
        _covers(covered[key], int(torch.Size(shape).numel()), tuple(shape))
    boxes = list(locals_.values())
    entries = [[None, *place] for place, _, _ in boxes]
    return {k: _join([flats[k].view(shape) for _, shape, flats in boxes], entries, vocab, target) for k in keys}


def read_rng(path: str, meta: dict, topo: Topology) -> tuple:
    """This rank's random-number state from checkpoint ``path``: ``(state, same_layout)``.

    Under the layout that saved it, every rank gets back its own streams, so the run continues bit for bit.
    Under another layout the streams cannot continue exactly (other ranks now run other layers and shards); each
    rank takes those of the saved rank at its coordinates modulo the saved sizes, which keeps the default
    generator identical across the TP ranks of a stage (hidden dropout on replicated activations). Checkpoints
    from before per-rank states hold one ``rng.pt`` (rank 0's), which every rank takes."""
    if "rng.pt" in meta["checksums"]:
        names, same = ["rng.pt"], False
    else:
        saved = meta.get("layout", {})
        s_tp, s_pp, s_dp, s_cp = (saved.get(k, 1) for k in ("tp", "pp", "dp", "cp"))
        same = (s_tp, s_pp, s_dp, s_cp) == (topo.tp, topo.pp, topo.dp, topo.cp)
        names = [_rng_file(topo.tp_rank % s_tp, topo.pp_rank % s_pp, topo.dp_rank % s_dp, topo.cp_rank % s_cp)]
    _verified(path, meta, names)
    return torch.load(os.path.join(path, names[0]), map_location="cpu", weights_only=True), same


def _entry_box(entry: list) -> list:
    """The ``[dim, start, stop]`` splits of an index entry ``[dim, start, stop, padded, (dim, start, stop)...]``."""
    return [entry[0:3]] + [entry[i:i + 3] for i in range(4, len(entry), 3)]


def _box(splits: list) -> dict:
    return {dim: (start, stop) for dim, start, stop in splits if dim is not None}


def _overlap(want: dict, have: dict, have_shape, want_shape, vocab, padded: bool):
    """Where a stored piece (at ``have``, shaped ``have_shape``) and a wanted part (``want``, ``want_shape``) of one
    global tensor meet: (source slices, destination slices), or None. Rows past the vocabulary are padding, never
    copied."""
    src, dst = [], []
    for d in range(len(want_shape)):
        hs, he = have.get(d, (0, have_shape[d]))
        ws, we = want.get(d, (0, want_shape[d]))
        lo, hi = max(hs, ws), min(he, we)
        if padded and d == 0 and vocab:
            hi = min(hi, vocab)
        if lo >= hi:
            return None
        src.append(slice(lo - hs, hi - hs))
        dst.append(slice(lo - ws, hi - ws))
    return tuple(src), tuple(dst)


def _join(pieces, entries, vocab_size, target=None):
    """The whole tensor from its pieces: each entry ``[file, dim, start, stop, padded, (dim, start, stop)...]``
    places its piece in a box of the whole (a second split for experts under expert tensor parallelism). With
    ``target`` ``(param, topo)``: only that parameter's part on this rank, in its shape (padding rows zero), read
    from the pieces that overlap it."""
    padded = entries[0][4]
    if target is not None:
        param, topo = target
        want = _box(_place(param, topo))
        out = torch.zeros(param.shape, dtype=pieces[0].dtype)
        covered = 0
        for piece, entry in zip(pieces, entries):
            where = _overlap(want, _box(_entry_box(entry[1:])), piece.shape, param.shape, vocab_size, padded)
            if where is not None:
                out[where[1]] = piece[where[0]]
                covered += math.prod(s.stop - s.start for s in where[1])
        rows = param.shape[0] if param.dim() else 1
        if padded and vocab_size and param.dim():  # rows past the vocabulary are padding: nobody saved them
            rows = max(0, min(want.get(0, (0, rows))[1], vocab_size) - want.get(0, (0, rows))[0])
        _covers(covered, rows * math.prod(param.shape[1:]), tuple(param.shape))
        return out
    if entries[0][1] is None:
        full = pieces[0].clone()
    else:
        boxes = [_entry_box(e[1:]) for e in entries]
        shape = list(pieces[0].shape)
        for box in boxes:
            for dim, _, stop in box:
                shape[dim] = max(shape[dim], stop)
        full = pieces[0].new_empty(shape)
        for piece, box in zip(pieces, boxes):
            where = [slice(None)] * len(shape)
            for dim, start, stop in box:
                where[dim] = slice(start, stop)
            full[tuple(where)] = piece
        _covers(sum(piece.numel() for piece in pieces), full.numel(), tuple(shape))
    return full[:vocab_size] if padded and vocab_size else full


def _covers(covered: int, total: int, shape: tuple) -> None:
    """Saved pieces are disjoint boxes: unless their sizes add up to the tensor's, part of it would load as zeros
    or as whatever memory held."""
    if covered != total:
        raise CheckpointError(f"the saved pieces cover {covered} of its {total} values (shape {shape}): a shard "
                              f"file or an index entry is missing")


def _mine(value, p, topo: Topology, local: bool):
    """This rank's part of a checkpoint tensor (it already is one when read with ``read_checkpoint(model=...)``)."""
    return value if local else shard_of(_pad(value, p, topo), p, topo)


@torch.no_grad()
def load_model_state(model, state: dict, topo: Topology, source: str, local: bool = False,
                     only: Optional[Callable] = None) -> None:
    """Copy the checkpoint's weights into ``model`` (cast to its dtype): ``state`` holds whole tensors, or with
    ``local`` this rank's parts. ``only(parameter)``: the parameters the checkpoint is for (LoRA: the base, or the
    adapters), default all."""
    names = {n: p for n, p in model.named_parameters() if only is None or only(p)}
    missing = sorted(set(names) - set(state))
    # under pipeline parallelism the other stages' parameters are expected
    unexpected = sorted(set(state) - set(names)) if topo.pp == 1 else []
    if missing or unexpected:
        raise CheckpointError(f"{source}: parameters do not match the model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); is the model config the same?")
    for name, p in names.items():
        shard = _mine(state[name], p, topo, local)
        if shard.shape != p.shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(state[name].shape)} in the checkpoint, "
                                  f"which does not fit {tuple(p.shape)} here; is the model config the same?")
        copy_into(p, shard)


def full_precision_values(model, state: dict, topo: Topology) -> dict:
    """``{parameter: this rank's values}`` at the checkpoint's full precision: the optimizer's fp32 main
    parameters where it saved them (bf16/fp16 runs), else the weights as saved (fp32 from an fp32 run)."""
    optimizer = state.get("optimizer") or {}
    out = {}
    for name, p in model.named_parameters():
        value = optimizer.get(name, {}).get("main_param", state["model"].get(name))
        if value is not None:
            out[p] = _mine(value, p, topo, state.get("local", False))
    return out


def load_optimizer_state(model, state: dict, topo: Topology, local: bool = False) -> dict:
    """{parameter: moments with this TP rank's whole tensors} from the checkpoint's (whole, or with ``local``
    this rank's parts); ``DistributedOptimizer.load_full_state`` copies out the pieces it keeps."""
    return {p: {k: (_mine(v, p, topo, local).to(p.device) if v.ndim > 0 else v.clone())
                for k, v in state[name].items() if k != "main_param"}
            for name, p in model.named_parameters() if name in state}
