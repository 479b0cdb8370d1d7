"""What a fine-tuning run adds around the Trainer: its datasets (SFT examples or DPO pairs, through the chat
template when there are conversations) and what its checkpoints say of LoRA (the adapters' settings and the base
they sit on), so that a resume, a load under another layout or an export puts them back on the same base.

The datasets are built once and cached (``--data-cache-path``, else ``cache/`` beside the data), keyed by the
file's size and time, the tokenizer, the template, the shape, the sequence length and the split: a requeued run
reads them back at once. Building, every rank tokenizes its share of the lines (line number modulo the world
size), rank 0 packs them all; a bad line stops every rank with the first bad line named.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional

import numpy as np
import torch.distributed as dist

from megalm.config import Config, parse_split
from megalm.data.chat_template import ChatTemplateError
from megalm.data.gpt_dataset import DatasetError
from megalm.data.preference import pair_parser, stack_splits
from megalm.data.sft import PackedDataset, example_parser, pack_splits, read_examples
from megalm.model.lora import merge_adapters
from megalm.training.checkpoint import check_same_model, read_checkpoint
from megalm.training.checkpoint_dirs import CheckpointError

log = logging.getLogger("megalm")


def chat_template(cfg: Config, tokenizer):
    """The run's chat template: ``--chat-template`` or the tokenizer's own; None when there is none and none was
    asked for (plain-text examples need none; a conversation then fails with its line named)."""
    choice = cfg.posttrain.chat_template
    try:
        return tokenizer.chat_template(choice)
    except ChatTemplateError as exc:
        if choice is not None:
            raise DatasetError(str(exc)) from None
        return None


def finetune_datasets(cfg: Config, tokenizer, rank: int = 0, world_size: int = 1) -> tuple:
    """(train, valid) of ``--sft-data`` or ``--dpo-data`` (valid None when ``--split`` gives it no share)."""
    d, seq = cfg.data, cfg.model.seq_length
    path = d.dpo_data or d.sft_data
    template = chat_template(cfg, tokenizer)
    if template is not None:
        log.info("chat template: %s%s", template.where,
                 " (its {% generation %} blocks mark the assistant's tokens)" if template.marks_generation else "")
    split = parse_split(d.split)
    stat = os.stat(path)
    key = {"kind": "dpo" if d.dpo_data else "sft", "file": os.path.abspath(path), "size": stat.st_size,
           "mtime_ns": stat.st_mtime_ns, "tokenizer": tokenizer.fingerprint, "seq_length": seq, "split": split,
           "template": hashlib.sha256(template.source.encode()).hexdigest() if template else None,
           "format": cfg.posttrain.sft_format if d.sft_data else None, "version": 1}
    if d.dpo_data:
        parse, combine = pair_parser(tokenizer, seq, template), lambda ex: stack_splits(ex, split)
    else:
        parse = example_parser(tokenizer, cfg.posttrain.sft_format, template)
        combine = lambda ex: pack_splits(ex, seq, split, path)  # noqa: E731
    folder = d.data_cache_path or os.path.join(os.path.dirname(os.path.abspath(path)), "cache")
    arrays = cached_build(folder, key, path, parse, combine, rank, world_size)
    seed = cfg.train.seed
    return PackedDataset(arrays["train"], seed), (PackedDataset(arrays["valid"], seed) if "valid" in arrays else None)


def cached_build(folder: str, key: dict, path: str, parse, combine, rank: int, world: int) -> dict:
    """``combine(examples)``'s ``{split: {name: array}}`` from the cache, or built: each rank parses its share of
    ``path``'s lines into a part file, rank 0 joins them in line order, combines and writes the cache. A
    ``DatasetError`` anywhere stops every rank with the same message."""
    digest = hashlib.md5(json.dumps(key, sort_keys=True).encode()).hexdigest()
    manifest = os.path.join(folder, f"{digest}-finetune.json")
    if not os.path.isfile(manifest):
        os.makedirs(folder, exist_ok=True)
        part = os.path.join(folder, f"{digest}-part{{}}.npz")
        try:
            mine, error = read_examples(path, parse, rank, world), None
            if world > 1:
                _write_part(part.format(rank), mine)
        except DatasetError as exc:
            mine, error = [], str(exc)
        try:
            _agree(error, world, first_line=True)  # every rank's share is read (and written), or all stop
        except DatasetError:
            if os.path.exists(part.format(rank)):
                os.remove(part.format(rank))
            raise
        error = None
        if rank == 0:
            try:
                _build(folder, digest, manifest, key, path, mine, part, combine, world)
            except DatasetError as exc:
                error = str(exc)
        _agree(error, world)
    elif world > 1:
        dist.barrier()
    with open(manifest) as fh:
        names = json.load(fh)["arrays"]
    return {s: {n: np.load(os.path.join(folder, f"{digest}-{s}-{n}.npy"), mmap_mode="r") for n in arrays}
            for s, arrays in names.items()}


def _build(folder, digest, manifest, key, path, examples, part, combine, world) -> None:
    if world > 1:
        examples = [e for r in range(world) for e in _read_part(part.format(r))]
        for r in range(world):
            os.remove(part.format(r))
    if not examples:
        raise DatasetError(f"{path}: no examples")
    examples.sort(key=lambda item: item[0])
    built = combine([example for _, example in examples])
    for split, arrays in built.items():
        for name, array in arrays.items():
            np.save(os.path.join(folder, f"{digest}-{split}-{name}.npy"), array)
    with open(manifest + ".tmp", "w") as fh:  # written last: the cache is complete
        json.dump({**key, "arrays": {s: sorted(a) for s, a in built.items()}}, fh)
    os.replace(manifest + ".tmp", manifest)
    log.info("%s: %s cached in %s", path, ", ".join(f"{len(a['ids'])} {s} samples" for s, a in built.items()),
             folder)


def _agree(error: Optional[str], world: int, first_line: bool = False) -> None:
    """Raise on every rank when any rank has an error: the one naming the earliest line (``first_line``), else
    the first rank's."""
    errors = [error]
    if world > 1:
        errors = [None] * world
        dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        raise DatasetError(min(failed, key=_line_of) if first_line else failed[0])


def _line_of(message: str) -> int:
    """The line a ``FILE:LINE: ...`` message names (errors without one sort last)."""
    try:
        return int(message.split(": ", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 1 << 62


def _write_part(path: str, examples: list) -> None:
    """One rank's parsed lines: each a dict of arrays (or an (ids, targets) pair), stored flat with lengths."""
    rows = [(line, ex if isinstance(ex, dict) else {"ids": ex[0], "targets": ex[1]}) for line, ex in examples]
    keys = sorted(rows[0][1]) if rows else []
    flat = {"lines": np.asarray([line for line, _ in rows], dtype=np.int64), "keys": np.asarray(keys)}
    for k in keys:
        flat[k] = np.concatenate([ex[k] for _, ex in rows])
        flat[k + "_len"] = np.asarray([len(ex[k]) for _, ex in rows], dtype=np.int64)
    np.savez(path, **flat)


def _read_part(path: str) -> list:
    part = np.load(path)
    keys, lines = [str(k) for k in part["keys"]], part["lines"].tolist()
    pieces = {k: np.split(part[k], np.cumsum(part[k + "_len"])[:-1]) if lines else [] for k in keys}
    out = []
    for i, line in enumerate(lines):
        ex = {k: pieces[k][i] for k in keys}
        out.append((line, ex if "docs" in ex else (ex["ids"], ex["targets"])))
    return out


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_target_modules")


def lora_meta(cfg: Config) -> Optional[dict]:
    """What a LoRA run's checkpoints record: the adapters' settings and the base (``--pretrained-checkpoint``)."""
    p = cfg.posttrain
    if not p.lora_rank:
        return None
    base = cfg.checkpoint.pretrained_checkpoint
    return {**{k: getattr(p, k) for k in LORA_KEYS}, "base": os.path.abspath(base) if base else None}


def check_lora(saved: Optional[dict], cfg: Config, path: str) -> None:
    """A checkpoint's adapters fit this run's (the same rank, scale and targets)."""
    mine = lora_meta(cfg)
    if saved is None:
        return
    if mine is None:
        raise CheckpointError(f"{path} holds LoRA adapters only (rank {saved['lora_rank']} on "
                              f"{' '.join(saved['lora_target_modules'])}): resume it with the same --lora-rank, "
                              f"--lora-alpha and --lora-target-modules, or merge it (megalm-export-hf --merge-lora)")
    differ = [k for k in LORA_KEYS if saved.get(k) != mine[k]]
    if differ:
        raise CheckpointError(f"{path}: its adapters differ from this run's in "
                              + ", ".join(f"--{k.replace('_', '-')} ({saved.get(k)} there, {mine[k]} here)"
                                          for k in differ))


def read_whole_model(path: str, base: Optional[str] = None) -> dict:
    """``read_checkpoint(path, ("model",))`` of a whole model. Of a checkpoint of LoRA adapters: its base's
    weights (``base``, else the base it records) with the adapters merged in (``W + alpha / r B A``), and
    ``state["lora"]`` the adapters' settings."""
    state = read_checkpoint(path, parts=("model",))
    lora = state["meta"].get("lora")
    if not lora:
        return state
    base = base or lora.get("base")
    if not base:
        raise CheckpointError(f"{state['path']} holds LoRA adapters and records no base (trained without "
                              f"--pretrained-checkpoint): name the base checkpoint (--base)")
    whole = read_checkpoint(base, parts=("model",))
    if whole["meta"].get("lora"):
        raise CheckpointError(f"{whole['path']}: the base of {state['path']} must be a whole model, not adapters")
    check_same_model(whole["config"].model, state["config"].model, whole["path"])
    state.update(model=merge_adapters({**whole["model"], **state["model"]}, lora["lora_alpha"], lora["lora_rank"]),
                 lora=lora, base=whole["path"])
    return state
