"""Train a tokenizer on a JSONL corpus, since none can be downloaded.

``--type bpe`` writes GPT-2-style ``vocab.json`` + ``merges.txt`` (use with ``--tokenizer-type GPT2BPETokenizer``)
and the same model as ``tokenizer.json`` (``HuggingFaceTokenizer``); ``--type sentencepiece`` writes
``tokenizer.model`` (``SentencePieceTokenizer``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, List

from megalm.data.jsonl import iter_documents

EOD = "<|endoftext|>"


def _texts(inputs: List[str], keys: List[str]) -> Iterator[str]:
    for doc in iter_documents(inputs, keys):
        for key in keys:
            yield doc[key]


def train_bpe(inputs, keys, vocab_size: int, output_dir: str) -> None:
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(_texts(inputs, keys), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOD],
                            show_progress=False)
    os.makedirs(output_dir, exist_ok=True)
    tok.save_model(output_dir)
    tok.save(os.path.join(output_dir, "tokenizer.json"))


def train_sentencepiece(inputs, keys, vocab_size: int, output_dir: str) -> None:
    import sentencepiece as spm

    os.makedirs(output_dir, exist_ok=True)
    spm.SentencePieceTrainer.train(sentence_iterator=_texts(inputs, keys),
                                   model_prefix=os.path.join(output_dir, "tokenizer"), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   max_sentence_length=1 << 16, minloglevel=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalm-train-tokenizer", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="JSONL files or globs (.gz allowed)")
    parser.add_argument("--json-keys", nargs="+", default=["text"])
    parser.add_argument("--type", choices=("bpe", "sentencepiece"), default="bpe")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    if args.vocab_size < 300:
        parser.error(f"--vocab-size {args.vocab_size} is too small: byte-level BPE needs more than 256 entries")
    try:
        (train_bpe if args.type == "bpe" else train_sentencepiece)(args.input, args.json_keys, args.vocab_size,
                                                                  args.output_dir)
    except ValueError as exc:
        print(f"megalm-train-tokenizer: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote a {args.type} tokenizer with up to {args.vocab_size} entries to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
