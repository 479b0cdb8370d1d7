"""Tokenizers named as Megatron names them; all local files, nothing downloaded.

Each has ``tokenize``, ``tokenize_batch``, ``encode_flat`` (the fast path preprocessing uses: every id of a batch
in one array), ``detokenize``, ``vocab_size``, ``eod`` and ``fingerprint`` (what the sample-index cache key
includes).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from typing import List, Optional, Sequence, Tuple

import numpy as np


class TokenizerError(ValueError):
    pass


def _file_digest(*paths: str) -> str:
    h = hashlib.md5()
    for path in paths:
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


class Tokenizer:
    name = "base"
    vocab_size: int
    eod: int

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.tokenize(t) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
        """Every text's ids concatenated (int32) and each text's count (int64)."""
        encoded = self.tokenize_batch(texts)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        return self.name

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Ids of ``text`` without added special tokens, and each token's character span (what a chat template's
        loss mask is mapped through); only tokenizers of the ``tokenizers`` library have them."""
        raise TokenizerError(f"{self.name} gives no character offsets, which chat templates need: use "
                             f"--tokenizer-type HuggingFaceTokenizer with the model's tokenizer.json")

    def chat_template(self, choice: Optional[str] = None):
        """The ``ChatTemplate`` of ``--chat-template`` (a file, a directory, a template name) or the tokenizer's
        own; ``ChatTemplateError`` when there is none."""
        from megalm.data.chat_template import load_chat_template

        return load_chat_template(self.folder, choice, self.encode_with_offsets)

    folder: Optional[str] = None  # where the tokenizer's files (and its chat template) are


def bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character map that byte-level vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def _letter_or_number(cp: int) -> int:
    major = unicodedata.category(chr(cp))[0]
    return 1 if major == "L" else 2 if major == "N" else 0


def _native_byte_bpe(vocab_file: str, merge_file: str, cache_entries: int = 1 << 18):
    """The compiled encoder (megalm._bpe) for these files, or None, with the reason in the log, without the
    extension or for files it cannot represent (a byte with no token, a merge whose parts or result are not in
    the vocabulary)."""
    def unavailable(reason: str):
        logging.getLogger("megalm").warning("GPT-2 BPE: %s; encoding with the slower tokenizers library", reason)
        return None

    try:
        from megalm import _bpe
    except ImportError as exc:
        return unavailable(f"megalm._bpe is not built ({exc}; pip install --no-build-isolation -e .)")
    with open(vocab_file, encoding="utf-8") as fh:
        vocab = json.load(fh)
    chars = bytes_to_unicode()
    byte_ids = [vocab.get(chars[b]) for b in range(256)]
    merges = []
    with open(merge_file, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            parts = line.split()
            if (n == 0 and line.startswith("#version")) or not parts:
                continue
            ids = (vocab.get(parts[0]), vocab.get(parts[1]), vocab.get(parts[0] + parts[1])) if len(parts) == 2 else ()
            if len(ids) != 3 or None in ids:
                return unavailable(f"{merge_file}:{n + 1}: merge {line.strip()!r} is not two pieces whose parts "
                                   f"and result are in {vocab_file}")
            merges.append(ids)
    if None in byte_ids:
        return unavailable(f"{vocab_file} has no token for byte {byte_ids.index(None)}")
    return _bpe.ByteBPE(byte_ids, merges, _letter_or_number, cache_entries)


class GPT2BPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``: ids identical to GPT-2's own encoder.

    ``encode_flat`` uses megalm's compiled encoder when it is built (several times faster than the ``tokenizers``
    library on one core; tests check the ids are the same), else ``tokenizers``.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import ByteLevelBPETokenizer

        self.vocab_file, self.merge_file = vocab_file, merge_file
        self.folder = os.path.dirname(os.path.abspath(vocab_file))
        self._tok = ByteLevelBPETokenizer(vocab_file, merge_file)
        self.vocab_size = self._tok.get_vocab_size()
        eod = self._tok.token_to_id("<|endoftext|>")
        if eod is None:
            raise TokenizerError(f"{vocab_file}: no '<|endoftext|>' entry, which GPT-2 BPE uses as end of document")
        self.eod = eod
        self._native: Optional[object] = None
        self._native_checked = False

    def tokenize_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def encode_flat(self, texts):
        if not self._native_checked:  # built on first use: training never pays for it
            self._native, self._native_checked = _native_byte_bpe(self.vocab_file, self.merge_file), True
        if self._native is None:
            return super().encode_flat(texts)
        return self._native.encode_batch(list(texts))

    def detokenize(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_with_offsets(self, text):
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    @property
    def fingerprint(self):
        return f"{self.name}-{_file_digest(self.vocab_file, self.merge_file)}"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``.

    By default (Megatron-LM since its tokenizers moved into ``megatron.core.tokenizers``, and its
    ``GPTSentencePieceTokenizer``) the vocabulary is the model's pieces and documents end with the model's EOS.
    With ``legacy`` (``--sentencepiece-legacy-specials``), Megatron-LM's older ``_SentencePieceTokenizer``
    (core_v0.9 to the 2025 releases): ``<CLS> <SEP> <EOD> <MASK>``, then the model's pad, BOS and EOS pieces
    (``<PAD> <BOS> <EOS>`` where it has none), then ``vocab_extra_ids`` ``<extra_id_N>`` are special tokens, each
    added after the pieces unless the model has it; documents end with ``<EOD>``, and a special token written in
    the text is that token's id.
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, legacy: bool = False, vocab_extra_ids: int = 0):
        import sentencepiece as spm

        self.model_file, self.legacy, self.vocab_extra_ids = model_file, legacy, vocab_extra_ids
        try:
            self._sp = spm.SentencePieceProcessor(model_file=model_file)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({exc})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.special = {}
        if legacy:
            self._add_legacy_specials(vocab_extra_ids)
            self.eod = self.special["<EOD>"]
            return
        if vocab_extra_ids:
            raise TokenizerError("--vocab-extra-ids needs --sentencepiece-legacy-specials (the older Megatron "
                                 "tokenizer that added them)")
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"{model_file}: the model has no eos piece to use as end of document")
        self.eod = self._sp.eos_id()

    def _add_legacy_specials(self, extra: int) -> None:
        pieces = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

        def own_piece(piece_id: int, fallback: str) -> str:
            return self._sp.id_to_piece(piece_id) if 0 <= piece_id < self.vocab_size else fallback

        names = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", own_piece(self._sp.pad_id(), "<PAD>"),
                 own_piece(self._sp.bos_id(), "<BOS>"), own_piece(self._sp.eos_id(), "<EOS>")]
        for name in names + [f"<extra_id_{i}>" for i in range(extra)]:
            if name not in pieces:
                pieces[name] = self.vocab_size
                self.vocab_size += 1
            self.special[name] = pieces[name]
        self._special_names = {i: n for n, i in self.special.items()}

    def _encode_legacy(self, text: str) -> List[int]:
        """Pieces between special tokens, each special token written in the text as its own id (leftmost first;
        at one position the one listed first)."""
        ids, pos = [], 0
        while True:
            found = [(text.find(name, pos), name) for name in self.special]
            found = [(at, order, name) for order, (at, name) in enumerate(found) if at >= 0]
            if not found:
                break
            at, _, name = min(found)
            ids += self._sp.encode(text[pos:at])
            ids.append(self.special[name])
            pos = at + len(name)
        return ids + self._sp.encode(text[pos:])

    def tokenize_batch(self, texts):
        if self.legacy:
            return [self._encode_legacy(t) for t in texts]
        return self._sp.encode(list(texts))

    def detokenize(self, ids):
        if not self.legacy:
            return self._sp.decode(list(ids))
        ids, text, last = list(ids), "", 0
        for i, tid in enumerate(ids):
            if tid in self._special_names:  # as the older Megatron tokenizer wrote them: spaced out
                text += self._sp.decode(ids[last:i]) + " " + self._special_names[tid] + " "
                last = i + 1
        return text + self._sp.decode(ids[last:])

    @property
    def fingerprint(self):
        legacy = f"-legacy{self.vocab_extra_ids}" if self.legacy else ""
        return f"{self.name}-{_file_digest(self.model_file)}{legacy}"


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``Llama2Tokenizer``: a SentencePiece model whose every text starts with BOS; documents end
    with EOS."""

    name = "Llama2Tokenizer"

    def __init__(self, model_file: str):
        super().__init__(model_file)
        if self._sp.bos_id() < 0:
            raise TokenizerError(f"{model_file}: Llama2Tokenizer needs a bos piece, the model has none")

    def tokenize_batch(self, texts):
        return [[self._sp.bos_id()] + ids for ids in self._sp.encode(list(texts))]


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>")


class HuggingFaceTokenizer(Tokenizer):
    """A local ``tokenizer.json`` (or a directory holding one) through the ``tokenizers`` library.

    End of document: ``eos_token`` from a ``tokenizer_config.json`` beside it, else the first of the usual names.
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        self.folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.exists(self.path):
            raise TokenizerError(f"{path}: no tokenizer.json there")
        try:
            self._tok = HFTokenizer.from_file(self.path)
        except Exception as exc:  # the Rust library raises its own exception type
            raise TokenizerError(f"{self.path}: not a Hugging Face tokenizer.json ({exc})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eod = self._find_eod()

    def _find_eod(self) -> int:
        cfg_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        names = list(_EOS_CANDIDATES)
        if os.path.exists(cfg_path):
            with open(cfg_path) as fh:
                eos = json.load(fh).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                names.insert(0, eos)
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        raise TokenizerError(f"{self.path}: no end-of-document token (looked for {', '.join(names)})")

    def tokenize_batch(self, texts):
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def encode_with_offsets(self, text):
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def detokenize(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    @property
    def fingerprint(self):
        return f"{self.name}-{_file_digest(self.path)}"


class NullTokenizer(Tokenizer):
    """Pre-tokenized input: text is space-separated ids below ``vocab_size``; id ``vocab_size`` is the end of
    document, so the model's vocabulary is ``vocab_size + 1`` (as in Megatron)."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int):
        self._ids = int(vocab_size)
        self.vocab_size = self._ids + 1
        self.eod = self._ids

    def tokenize(self, text):
        try:
            ids = [int(x) for x in text.split()]
        except ValueError:
            raise TokenizerError(f"NullTokenizer: text must be space-separated integers, got {text[:40]!r}") from None
        bad = [i for i in ids if not 0 <= i < self._ids]
        if bad:
            raise TokenizerError(f"NullTokenizer: id {bad[0]} outside [0, {self._ids})")
        return ids

    def detokenize(self, ids):
        return " ".join(str(i) for i in ids)

    @property
    def fingerprint(self):
        return f"{self.name}-{self._ids}"


def build_tokenizer(data_cfg) -> Tokenizer:
    """The tokenizer a ``DataConfig`` (or any object with its fields) names."""
    kind = data_cfg.tokenizer_type
    if kind == "GPT2BPETokenizer":
        return GPT2BPETokenizer(data_cfg.vocab_file, data_cfg.merge_file)
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        legacy = kind == "SentencePieceTokenizer" and getattr(data_cfg, "sentencepiece_legacy_specials", False)
        return SentencePieceTokenizer(data_cfg.tokenizer_model, legacy, getattr(data_cfg, "vocab_extra_ids", 0))
    if kind == "Llama2Tokenizer":
        return Llama2Tokenizer(data_cfg.tokenizer_model)
    if kind == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(data_cfg.tokenizer_model)
    if kind == "NullTokenizer":
        return NullTokenizer(data_cfg.vocab_size)
    raise TokenizerError(f"--tokenizer-type {kind!r} is unknown (known: GPT2BPETokenizer, SentencePieceTokenizer, "
                         f"GPTSentencePieceTokenizer, Llama2Tokenizer, HuggingFaceTokenizer, NullTokenizer)")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Vocabulary rounded up to a multiple of ``divisible_by * tp`` so it splits evenly across TP ranks."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
