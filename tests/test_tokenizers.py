"""Every tokenizer round-trips; GPT-2 BPE ids equal an independent encoder's (tiktoken) on the corpus."""
import json
import os
import random

import numpy as np
import pytest

from conftest import require
from megalm.data.tokenizers import (GPT2BPETokenizer, HuggingFaceTokenizer, NullTokenizer, SentencePieceTokenizer,
                                    TokenizerError, build_tokenizer, bytes_to_unicode, padded_vocab_size)

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def test_gpt2_bpe_matches_tiktoken(bpe_dir, corpus_texts):
    tiktoken = require("tiktoken")
    chars = bytes_to_unicode()
    assert (chars[ord(" ")], chars[ord("\n")], chars[ord("A")]) == ("Ġ", "Ċ", "A")  # as GPT-2's vocab.json writes them
    decoder = {v: k for k, v in chars.items()}
    with open(os.path.join(bpe_dir, "vocab.json")) as fh:
        vocab = json.load(fh)
    ranks = {bytes(decoder[c] for c in tok): i for tok, i in vocab.items() if tok != "<|endoftext|>"}
    # tiktoken merges by rank, which equals merge order only when ids follow merge order: check that first
    with open(os.path.join(bpe_dir, "merges.txt")) as fh:
        merges = [line.split() for line in fh if line.strip() and not line.startswith("#version")]
    merged_ids = [vocab[a + b] for a, b in merges]
    assert merged_ids == sorted(merged_ids)
    enc = tiktoken.Encoding("test-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ours = GPT2BPETokenizer(os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt"))
    texts = corpus_texts[:300] + ["  leading spaces\n\ttabs and ünïcödé — 123 4567 it's we'll", ""]
    expected = enc.encode_ordinary_batch(texts)
    assert ours.tokenize_batch(texts) == expected
    flat, lengths = ours.encode_flat(texts)  # the compiled encoder preprocessing uses, when built
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]


# pieces that exercise every branch of the GPT-2 split pattern: contractions (case-sensitive), a space before
# letters/numbers/punctuation, whitespace runs before a word or at the end, Unicode White_Space that Python's
# str.isspace disagrees with (\x1c, \x85), letters and numbers outside ASCII, combining marks, emoji, unassigned
_EDGE_PIECES = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'", "''", " ", "  ", "\t", "\n", "\r\n", "\x0b",
                "\x1c", "\x85", "\xa0", "\u2028", "\u3000", "\u200b", "the", "The", " dog", "123", "4.5", "½", "Ⅻ",
                "é", "e\u0301", "日本語", "🙂", "👍🏽", "!", "?!", "...", "\"", "(", "ß", "ǅ", "٣", "x²", "\U0001d400",
                "_", "a_b", "<|endoftext|>", "\x00", "\ufeff", "İ", "\u0378", "\U000e0001"]


def test_compiled_bpe_matches_tokenizers_on_edge_cases(bpe_dir, corpus_texts):
    from megalm.data.tokenizers import _native_byte_bpe

    vocab, merges = os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt")
    ref = GPT2BPETokenizer(vocab, merges)
    rng = random.Random(0)
    texts = ["".join(rng.choice(_EDGE_PIECES) for _ in range(rng.randint(0, 25))) for _ in range(3000)]
    # one 200,000-letter piece (no space or punctuation): merged in O(n log n), where rescanning is quadratic
    texts.append("".join(c for c in "".join(corpus_texts).lower() if "a" <= c <= "z")[:200_000])
    expected = ref.tokenize_batch(texts)
    for cache_entries in (262144, 7):  # the default, and one small enough to be cleared many times
        native = _native_byte_bpe(vocab, merges, cache_entries)
        if native is None:
            require("megalm._bpe")  # skipped without the extension, except under CI
            raise AssertionError("megalm._bpe is built but refused these files (see the log)")
        flat, lengths = native.encode_batch(texts)
        assert flat.dtype == np.int32 and lengths.dtype == np.int64
        assert lengths.tolist() == [len(e) for e in expected]
        assert flat.tolist() == [i for e in expected for i in e]
        assert native.cache_size <= cache_entries


def test_gpt2_round_trip(bpe_dir, corpus_texts):
    tok = GPT2BPETokenizer(os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt"))
    for text in corpus_texts[:50] + ["ünïcödé and emoji 🙂"]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.eod == tok._tok.token_to_id("<|endoftext|>")
    assert tok.vocab_size == 1024


def test_huggingface_tokenizer_json(bpe_dir, corpus_texts):
    tok = HuggingFaceTokenizer(bpe_dir)  # directory holding tokenizer.json
    gpt2 = GPT2BPETokenizer(os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt"))
    assert tok.tokenize(corpus_texts[0]) == gpt2.tokenize(corpus_texts[0])
    assert tok.detokenize(tok.tokenize(corpus_texts[1])) == corpus_texts[1]
    assert tok.eod == gpt2.eod


def test_sentencepiece(tmp_path, corpus):
    from megalm.tools.train_tokenizer import train_sentencepiece

    train_sentencepiece([corpus], ["text"], 600, str(tmp_path))
    tok = SentencePieceTokenizer(str(tmp_path / "tokenizer.model"))
    text = "Return the number of items in the container."
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.vocab_size == 600 and tok.eod == tok._sp.eos_id()


def test_sentencepiece_megatron_modes(tmp_path, corpus):
    """The older Megatron _SentencePieceTokenizer (--sentencepiece-legacy-specials): on a 600-piece model (unk 0,
    bos 1, eos 2, no pad) <CLS> 600, <SEP> 601, <EOD> 602, <MASK> 603, <PAD> 604, then extra ids; documents end
    with <EOD> 602 and the vocabulary is 605 (+ extra ids). Llama2Tokenizer starts every text with BOS;
    GPTSentencePieceTokenizer is the default mode. preprocess writes each."""
    import numpy as np

    from megalm.data.indexed import IndexedDataset
    from megalm.tools.preprocess_data import main as preprocess
    from megalm.tools.train_tokenizer import train_sentencepiece

    train_sentencepiece([corpus], ["text"], 600, str(tmp_path))
    model = str(tmp_path / "tokenizer.model")
    plain = SentencePieceTokenizer(model)
    legacy = SentencePieceTokenizer(model, legacy=True, vocab_extra_ids=2)
    assert (legacy.vocab_size, legacy.eod) == (607, 602)
    assert legacy.special == {"<CLS>": 600, "<SEP>": 601, "<EOD>": 602, "<MASK>": 603, "<PAD>": 604, "<s>": 1,
                              "</s>": 2, "<extra_id_0>": 605, "<extra_id_1>": 606}
    text = "Return the items."
    assert legacy.tokenize(text) == plain.tokenize(text)
    assert legacy.tokenize(f"{text}<SEP>{text}</s>") == plain.tokenize(text) + [601] + plain.tokenize(text) + [2]
    assert legacy.detokenize(legacy.tokenize(f"{text}<EOD>")) == f"{text} <EOD> "
    assert legacy.fingerprint != plain.fingerprint
    llama = build_tokenizer(type("D", (), {"tokenizer_type": "Llama2Tokenizer", "tokenizer_model": model})())
    assert llama.tokenize(text) == [1] + plain.tokenize(text) and (llama.eod, llama.vocab_size) == (2, 600)
    doc = tmp_path / "doc.jsonl"
    doc.write_text('{"text": "Return the items."}\n{"text": "A second one."}\n')
    expected = {"legacy": (plain.tokenize("Return the items.") + [602], "--sentencepiece-legacy-specials"),
                "gptsp": (plain.tokenize("Return the items.") + [2], None),
                "llama": ([1] + plain.tokenize("Return the items.") + [2], None)}
    for name, (ids, flag) in expected.items():
        kind = {"legacy": "SentencePieceTokenizer", "gptsp": "GPTSentencePieceTokenizer",
                "llama": "Llama2Tokenizer"}[name]
        argv = ["--input", str(doc), "--output-prefix", str(tmp_path / name), "--tokenizer-type", kind,
                "--tokenizer-model", model, "--append-eod"] + ([flag] if flag else [])
        assert preprocess(argv) == 0
        ds = IndexedDataset(str(tmp_path / f"{name}_text_document"))
        assert np.asarray(ds[0]).tolist() == ids


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer-type", "TikTokenizer"], "--tokenizer-type TikTokenizer is Megatron-LM's, not implemented"),
    (["--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--sentencepiece-legacy-specials"],
     "apply to SentencePieceTokenizer, not NullTokenizer"),
])
def test_megatron_tokenizer_names(argv, message):
    from megalm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(argv, world_size=1)


def test_null_tokenizer():
    tok = NullTokenizer(100)
    assert tok.tokenize("1 2 99") == [1, 2, 99]
    assert tok.detokenize([1, 2]) == "1 2"
    assert tok.eod == 100 and tok.vocab_size == 101
    with pytest.raises(TokenizerError, match="id 100 outside"):
        tok.tokenize("100")
    with pytest.raises(TokenizerError, match="space-separated integers"):
        tok.tokenize("a b")


def test_bad_tokenizer_files(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="bad.model: not a SentencePiece model"):
        SentencePieceTokenizer(str(bad))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        HuggingFaceTokenizer(str(tmp_path))

    class Cfg:
        tokenizer_type = "Bogus"

    with pytest.raises(TokenizerError, match="--tokenizer-type 'Bogus' is unknown"):
        build_tokenizer(Cfg())


def test_padded_vocab():
    assert padded_vocab_size(1000, 128, 1) == 1024
    assert padded_vocab_size(1000, 128, 2) == 1024
    assert padded_vocab_size(1025, 128, 4) == 1536


def test_native_bpe_says_why_it_is_unavailable(tmp_path, bpe_dir, caplog):
    """Files the compiled encoder cannot represent fall back to the tokenizers library, and the log says why."""
    import logging

    from megalm.data.tokenizers import _native_byte_bpe

    merges = tmp_path / "merges.txt"
    merges.write_text(open(os.path.join(bpe_dir, "merges.txt")).read() + "zzzq zzzr\n")
    with caplog.at_level(logging.WARNING, logger="megalm"):
        assert _native_byte_bpe(os.path.join(bpe_dir, "vocab.json"), str(merges)) is None
    assert "merges.txt:" in caplog.text and "'zzzq zzzr' is not two pieces whose parts" in caplog.text
