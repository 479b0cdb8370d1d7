"""What a fine-tuning run adds around the Trainer: its datasets (SFT examples or DPO pairs, through the chat
template when there are conversations) and what its checkpoints say of LoRA (the adapters' settings and the base
they sit on), so that a resume, a load under another layout or an export puts them back on the same base."""
from __future__ import annotations

import logging
import os
from typing import Optional

from megalm.config import Config, parse_split
from megalm.data.chat_template import ChatTemplateError
from megalm.data.gpt_dataset import DatasetError
from megalm.data.preference import build_preference_datasets
from megalm.data.sft import build_sft_datasets
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


def finetune_datasets(cfg: Config, tokenizer) -> tuple:
    """(train, valid) of ``--sft-data`` or ``--dpo-data``."""
    d, t = cfg.data, cfg.train
    template = chat_template(cfg, tokenizer)
    if template is not None:
        log.info("chat template: %s%s", template.where,
                 " (its {% generation %} blocks mark the assistant's tokens)" if template.marks_generation else "")
    split = parse_split(d.split)
    if d.dpo_data:
        return build_preference_datasets(d.dpo_data, tokenizer, cfg.model.seq_length, split, t.seed, template)
    return build_sft_datasets(d.sft_data, tokenizer, cfg.model.seq_length, split, t.seed, cfg.posttrain.sft_format,
                              template)


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
