"""The data section: datasets and their blend, the split, the tokenizer, fine-tuning data; parsing of the split
and of weighted data paths, and the rules that files named by these flags exist. No torch here:
``megalm-preprocess`` validates its tokenizer flags with this module."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from megalm.config.fields import ConfigError, opt, positive

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
                   "HuggingFaceTokenizer", "NullTokenizer")
# Megatron-LM's other --tokenizer-type names: accepted by the parser so that the error names what is missing
MEGATRON_ONLY_TOKENIZERS = ("TikTokenizer", "BertWordPieceLowerCase", "BertWordPieceCase", "MultimodalTokenizer",
                            "Llama3Tokenizer", "MistralTokenizer")


@dataclass
class DataConfig:
    data_path: list = opt([], "dataset prefix, or weight prefix pairs to blend: 0.3 A 0.7 B", nargs="+")
    train_data_path: list = opt([], "training data only (prefix, or weight prefix pairs); replaces --data-path and "
                                "--split for training", nargs="+")
    valid_data_path: list = opt([], "validation data only, like --train-data-path", nargs="+")
    split: str = opt("969,30,1", "train,valid,test proportions of the documents")
    tokenizer_type: str = opt("GPT2BPETokenizer", "tokenizer (Megatron's names and semantics; README lists which "
                              "Megatron-LM version each matches)", choices=TOKENIZER_TYPES + MEGATRON_ONLY_TOKENIZERS)
    tokenizer_model: Optional[str] = opt(None, "SentencePiece .model, or tokenizer.json / its directory")
    sentencepiece_legacy_specials: bool = opt(False, "SentencePieceTokenizer as Megatron-LM's older "
                                              "_SentencePieceTokenizer (core_v0.9 .. 2025): <CLS> <SEP> <EOD> <MASK> "
                                              "(and <PAD> <BOS> <EOS> where missing) added after the pieces, "
                                              "documents ended by <EOD>")
    vocab_extra_ids: int = opt(0, "with --sentencepiece-legacy-specials: this many <extra_id_N> tokens added too")
    vocab_file: Optional[str] = opt(None, "GPT-2 BPE vocab.json")
    merge_file: Optional[str] = opt(None, "GPT-2 BPE merges.txt")
    vocab_size: Optional[int] = opt(None, "vocabulary of NullTokenizer (ids 0..N-1; N is the end-of-document id)")
    data_cache_path: Optional[str] = opt(None, "where sample indices are cached (default: beside the data)")
    eod_mask_loss: bool = opt(False, "no loss on positions whose input token is the end-of-document id")
    reset_position_ids: bool = opt(False, "restart position ids after every end-of-document token")
    reset_attention_mask: bool = opt(False, "attention does not cross end-of-document tokens (packed documents)")
    sft_data: Optional[str] = opt(None, "supervised fine-tuning: JSON lines of conversations (rendered with the "
                                  "chat template) or prompt/response pairs (--sft-format), instead of --data-path; "
                                  "the loss on what the assistant writes, examples packed")
    dpo_data: Optional[str] = opt(None, "preference optimisation (DPO): JSON lines of {prompt, chosen, rejected} "
                                  "(text or messages), or chosen/rejected conversations, instead of --data-path")


def parse_split(split: str) -> list:
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--split {split!r}: expected comma-separated numbers such as 969,30,1") from None
    if not parts or len(parts) > 3 or any(p < 0 or not math.isfinite(p) for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def parse_data_path(paths: list, flag: str = "--data-path") -> list:
    """[(weight, prefix), ...] from ``A`` or ``0.3 A 0.7 B``; weights normalised to sum 1."""
    if len(paths) == 1:
        return [(1.0, paths[0])]
    if len(paths) % 2:
        raise ConfigError(f"{flag}: with several datasets give weight-prefix pairs, got {len(paths)} values")
    pairs = []
    for weight, prefix in zip(paths[0::2], paths[1::2]):
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"{flag}: {weight!r} should be the weight before {prefix!r}") from None
        if not (w > 0 and math.isfinite(w)):
            raise ConfigError(f"{flag}: weight {weight} of {prefix} must be positive")
        pairs.append((w, prefix))
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def validate_data(d: DataConfig) -> None:
    parse_split(d.split)
    validate_tokenizer(d)
    for flag, paths in (("--data-path", d.data_path), ("--train-data-path", d.train_data_path),
                        ("--valid-data-path", d.valid_data_path)):
        for _, prefix in parse_data_path(paths, flag) if paths else []:
            for ext in (".idx", ".bin"):
                if not os.path.exists(prefix + ext):
                    raise ConfigError(f"{flag}: {prefix + ext} does not exist (give the prefix, without "
                                      f".bin/.idx; megalm-preprocess writes PREFIX_text_document.bin/.idx)")
    if d.data_path and (d.train_data_path or d.valid_data_path):
        raise ConfigError("give --data-path (split by --split) or --train-data-path/--valid-data-path, not both")
    if d.valid_data_path and not d.train_data_path:
        raise ConfigError("--valid-data-path needs --train-data-path")
    for flag, path in (("--sft-data", d.sft_data), ("--dpo-data", d.dpo_data)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise ConfigError(f"{flag}: no such file {path}")
        if d.data_path or d.train_data_path:
            raise ConfigError(f"give --data-path (pretraining) or {flag} (fine-tuning), not both")
    if d.sft_data and d.dpo_data:
        raise ConfigError("give --sft-data (supervised fine-tuning) or --dpo-data (preference optimisation), not both")


def validate_tokenizer(d: DataConfig) -> None:
    kind = d.tokenizer_type
    model = [("tokenizer_model", "--tokenizer-model")]
    need = {"GPT2BPETokenizer": [("vocab_file", "--vocab-file"), ("merge_file", "--merge-file")],
            "SentencePieceTokenizer": model, "GPTSentencePieceTokenizer": model, "Llama2Tokenizer": model,
            "HuggingFaceTokenizer": model, "NullTokenizer": []}
    if kind in MEGATRON_ONLY_TOKENIZERS:
        raise ConfigError(f"--tokenizer-type {kind} is Megatron-LM's, not implemented by megalm (it has: "
                          f"{', '.join(need)}); a HuggingFaceTokenizer tokenizer.json often serves the same model")
    if kind not in need:
        raise ConfigError(f"--tokenizer-type {kind!r} is unknown (known: {', '.join(need)})")
    for attr, flag in need[kind]:
        path = getattr(d, attr)
        if not path:
            raise ConfigError(f"--tokenizer-type {kind} needs {flag}")
        if not os.path.exists(path):
            raise ConfigError(f"{flag}: {path} does not exist")
    if kind == "NullTokenizer":
        positive(d.vocab_size, "--vocab-size (NullTokenizer)")
    if (d.sentencepiece_legacy_specials or d.vocab_extra_ids) and kind != "SentencePieceTokenizer":
        raise ConfigError(f"--sentencepiece-legacy-specials and --vocab-extra-ids apply to SentencePieceTokenizer, "
                          f"not {kind}")
    if d.vocab_extra_ids < 0 or (d.vocab_extra_ids and not d.sentencepiece_legacy_specials):
        raise ConfigError("--vocab-extra-ids must be >= 0, and needs --sentencepiece-legacy-specials")
