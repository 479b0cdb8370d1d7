"""Hugging Face interop: ``megalm-export-hf`` writes a transformers directory (GPT-2, Llama (with Llama 3.1's RoPE
scaling), Mistral, Qwen2/2.5, Qwen3, Mixtral or Qwen3-MoE: safetensors weights, config.json, the run's tokenizer
files and chat template) from a checkpoint of any layout; a checkpoint of LoRA adapters is written merged into its
base (``--merge-lora``) or as a PEFT adapter directory (``--lora-format peft``, ``megalm.interop.peft``).
``megalm-import-hf`` turns such a directory into a megalm checkpoint that loads under any layout. Each family's
config mapping and tensor names are a class in ``families/``; this module moves files. transformers itself is not
needed here, only to load the result.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from typing import Optional

import torch

from megalm.config import Config, ModelConfig
from megalm.interop.families import ConversionError, family_of, family_of_config
from megalm.training.checkpoint import CheckpointError, read_checkpoint
from megalm.training.finetune import read_whole_model

log = logging.getLogger("megalm")


def flavour(m: ModelConfig) -> str:
    """The transformers ``model_type`` of a megalm model, or a ConversionError naming what no family has."""
    return family_of(m).model_type


def hf_config(m: ModelConfig, vocab: int, eod: int, dtype: str = "float32") -> dict:
    return family_of(m).hf_config(m, vocab, eod, dtype)


def to_hf(m: ModelConfig, state: dict) -> dict:
    """transformers state dict from megalm's full-tensor state."""
    out = {}
    for rename in family_of(m).renames(m):
        rename.export(state, out)
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(m: ModelConfig, hf: dict) -> dict:
    """megalm's full-tensor state from a transformers state dict (inverse of ``to_hf``)."""
    out = {}
    for rename in family_of(m).renames(m):
        rename.load(hf, out)
    return {k: v.float().contiguous() for k, v in out.items()}


def model_config_from_hf(hf: dict) -> ModelConfig:
    """megalm's model config from a transformers config.json; every key that would change the computation and
    that megalm does not implement stops the import, named."""
    return family_of_config(hf).model_config(hf)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer.model")
# what else a tokenizer directory holds that a chat needs: the special tokens and the chat template
TOKENIZER_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def _tokenizer_files(cfg: Config) -> list:
    d = cfg.data
    paths = [d.vocab_file, d.merge_file, d.tokenizer_model]
    dirs = {os.path.dirname(p) for p in paths if p and os.path.isfile(p)} | {p for p in paths if p and os.path.isdir(p)}
    found = [p for p in paths if p and os.path.isfile(p)]
    for folder in dirs:  # the tokenizer.json megalm-train-tokenizer writes beside vocab.json/merges.txt
        found += [os.path.join(folder, f) for f in TOKENIZER_FILES + TOKENIZER_CONFIG_FILES
                  if os.path.isfile(os.path.join(folder, f))]
    return sorted(set(found))


def export_hf(load: str, output: str, merge_lora: bool = False, lora_format: Optional[str] = None,
              base: Optional[str] = None) -> str:
    """A transformers directory from a checkpoint; one of LoRA adapters needs ``merge_lora`` (merged into
    ``base``, by default the base it records) or ``lora_format="peft"`` (the adapters as PEFT saves them)."""
    from safetensors.torch import save_file

    from megalm.data.tokenizers import build_tokenizer

    adapters = (read_checkpoint(load, ())["meta"].get("lora") or None)
    if adapters is None and (merge_lora or lora_format or base):
        raise ConversionError(f"{load} holds a whole model, no LoRA adapters: export it without --merge-lora, "
                              f"--lora-format and --base")
    if merge_lora and lora_format:
        raise ConversionError("--merge-lora and --lora-format: choose one (merged weights, or the adapters alone)")
    if adapters is not None and lora_format == "peft":
        from megalm.interop.peft import export_peft

        return export_peft(read_checkpoint(load, parts=("model",)), output)
    if adapters is not None and not merge_lora:
        raise ConversionError(f"{load} holds LoRA adapters only: add --merge-lora (their base with the adapters "
                              f"merged in: a whole transformers model) or --lora-format peft (an adapter directory "
                              f"for peft.PeftModel)")
    state = read_whole_model(load, base)
    cfg = state["config"]
    tok = build_tokenizer(cfg.data)
    weights = to_hf(cfg.model, state["model"])  # in the checkpoint's dtype: bf16 from a --bf16 run
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    os.makedirs(output, exist_ok=True)
    save_file(weights, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output, "config.json"), "w") as fh:
        json.dump(hf_config(cfg.model, tok.vocab_size, tok.eod, dtype), fh, indent=1)
    copied = _tokenizer_files(cfg)
    for path in copied:
        shutil.copy(path, os.path.join(output, os.path.basename(path)))
    if "tokenizer_config.json" not in {os.path.basename(p) for p in copied}:  # the tokenizer's own, else this
        eos = tok.detokenize([tok.eod]) if cfg.data.tokenizer_type != "NullTokenizer" else None
        with open(os.path.join(output, "tokenizer_config.json"), "w") as fh:
            json.dump({"model_max_length": cfg.model.max_position_embeddings, "eos_token": eos, "bos_token": eos,
                       "unk_token": eos, "add_prefix_space": False}, fh, indent=1)
    merged = f" (LoRA adapters merged into {state['base']})" if "lora" in state else ""
    log.info("exported %s%s (%s flavour) to %s", state["path"], merged, flavour(cfg.model), output)
    return output


def _read_hf_weights(folder: str) -> dict:
    st = os.path.join(folder, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded checkpoints: merge first)")


def _tokenizer_flags(d, folder: str) -> None:
    """Point the data config at the tokenizer files in ``folder`` (GPT-2 BPE, tokenizer.json or SentencePiece)."""
    def there(name):
        return os.path.join(folder, name)

    if os.path.exists(there("tokenizer.json")):  # what transformers reads first: with the added special tokens
        d.tokenizer_type, d.tokenizer_model = "HuggingFaceTokenizer", there("tokenizer.json")
    elif all(os.path.exists(there(f)) for f in ("vocab.json", "merges.txt")):
        d.tokenizer_type, d.vocab_file, d.merge_file = "GPT2BPETokenizer", there("vocab.json"), there("merges.txt")
    elif os.path.exists(there("tokenizer.model")):
        d.tokenizer_type, d.tokenizer_model = "SentencePieceTokenizer", there("tokenizer.model")
    else:
        raise ConversionError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def read_hf_config(folder: str) -> dict:
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{folder}: no config.json")
    try:
        with open(config_path) as fh:
            hf = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{config_path}: not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{config_path}: expected a JSON object, found {type(hf).__name__}")
    return hf


def import_hf(folder: str, save: str) -> str:
    """Everything is read and checked (config, tokenizer, every tensor) before anything is written."""
    from megalm.config import ConfigError
    from megalm.config.model import fill_model_defaults, validate_model
    from megalm.data.tokenizers import build_tokenizer
    from megalm.model.gpt import GPT
    from megalm.parallel.state import Topology
    from megalm.training.checkpoint import load_model_state, save_checkpoint

    hf = read_hf_config(folder)
    cfg = Config()
    try:
        cfg.model = model_config_from_hf(hf)
        fill_model_defaults(cfg.model)
        validate_model(cfg.model)
    except ConversionError:
        raise
    except KeyError as exc:
        raise ConversionError(f"{folder}/config.json: lacks {exc.args[0]!r}") from None
    except ConfigError as exc:  # a shape megalm's own rules refuse
        raise ConversionError(f"{folder}/config.json: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConversionError(f"{folder}/config.json: a value of the wrong type ({exc})") from None
    _tokenizer_flags(cfg.data, folder)
    tok = build_tokenizer(cfg.data)
    weights = _read_hf_weights(folder)
    family_of_config(hf).fit_to_weights(cfg.model, weights)
    try:
        state = from_hf(cfg.model, weights)
    except KeyError as exc:
        raise ConversionError(f"{folder}: the weights lack {exc.args[0]}, which config.json's model has") from None
    for name in ("embedding.weight", "output.weight"):
        if name in state:
            rows = state[name].shape[0]
            if rows < tok.vocab_size:
                raise ConversionError(f"{folder}: {rows} embedding rows for a tokenizer of {tok.vocab_size}")
            state[name] = state[name][: tok.vocab_size]  # rows past the tokenizer are padding
    model = GPT(cfg.model, tok.vocab_size, Topology())
    load_model_state(model, state, Topology(), folder)
    tok_dir = os.path.join(save, "tokenizer")  # checked: now the copies the checkpoint's config names
    os.makedirs(tok_dir, exist_ok=True)
    for f in TOKENIZER_FILES + TOKENIZER_CONFIG_FILES:  # its chat template too
        if os.path.exists(os.path.join(folder, f)):
            shutil.copy(os.path.join(folder, f), os.path.join(tok_dir, f))
    _tokenizer_flags(cfg.data, tok_dir)  # the same files: the fingerprint (of their contents) stands
    meta = {"consumed_samples": 0, "tokenizer": tok.fingerprint, "imported_from": os.path.abspath(folder)}
    path = save_checkpoint(save, 0, model, {}, cfg, Topology(), meta, {})
    log.info("imported %s (%s) into %s", folder, hf.get("model_type"), path)
    return path


def _cli(argv, prog: str, description: str, flags: list, action, errors: tuple) -> int:
    """One command: ``flags`` are (name, help) pairs, all required; ``action`` gets their values in order."""
    from megalm.training.logging import setup_logging

    p = argparse.ArgumentParser(prog=prog, description=description)
    for name, help_text in flags:
        p.add_argument(name, required=True, help=help_text)
    args = vars(p.parse_args(argv))
    setup_logging(0)
    try:
        action(*(args[name.lstrip("-").replace("-", "_")] for name, _ in flags))
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def export_main(argv=None) -> int:
    from megalm.training.logging import setup_logging

    p = argparse.ArgumentParser(prog="megalm-export-hf", description="megalm checkpoint -> transformers directory")
    p.add_argument("--load", required=True, help="checkpoint (a --save root or an iter_* directory), any layout")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--merge-lora", action="store_true", help="a checkpoint of LoRA adapters: write its base with "
                   "the adapters merged in (W + alpha / rank B A), a whole transformers model")
    p.add_argument("--lora-format", choices=("peft",), help="a checkpoint of LoRA adapters: write them as a PEFT "
                   "adapter directory (adapter_config.json, adapter_model.safetensors) for peft.PeftModel, to load "
                   "onto the base exported on its own")
    p.add_argument("--base", help="with --merge-lora: the base checkpoint (default: the one the adapters record)")
    args = p.parse_args(argv)
    setup_logging(0)
    try:
        export_hf(args.load, args.output, args.merge_lora, args.lora_format, args.base)
    except (CheckpointError, ConversionError, FileNotFoundError) as exc:
        print(f"megalm-export-hf: error: {exc}", file=sys.stderr)
        return 2
    return 0


def import_main(argv=None) -> int:
    return _cli(argv, "megalm-import-hf", "transformers directory -> megalm checkpoint",
                [("--input", "local directory with config.json and model.safetensors"),
                 ("--save", "checkpoint directory to write (iteration 0)")], import_hf,
                (CheckpointError, ConversionError, FileNotFoundError, KeyError))


if __name__ == "__main__":
    sys.exit(export_main())
