"""megalm-preprocess: byte-identical to a Megatron-style builder, parallel == serial, clear errors on bad input."""
import gzip
import json
import os
import warnings

import numpy as np

from conftest import run_module
from megalm.data.indexed import IndexedDataset
from megalm.data.tokenizers import GPT2BPETokenizer
from megalm.tools.preprocess_data import build_parser, run, split_sentences


def preprocess(*argv):
    return run(build_parser().parse_args([str(a) for a in argv]))


def megatron_reference(corpus, prefix, tok, keys=("text",)):
    """What Megatron's tools/preprocess_data.py writes: megatron-core's builder, one tokenize call per document."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tok.vocab_size))
    with open(corpus) as fh:
        for line in fh:
            text = json.loads(line)[keys[0]]
            ids = tok.tokenize(text)
            lens = [len(ids)] if ids else []
            if ids:
                ids = ids + [tok.eod]
                lens[-1] += 1
            builder.add_document(torch.tensor(ids, dtype=torch.int64), lens)
    builder.finalize(prefix + ".idx")


def test_byte_identical_to_megatron_builder(tmp_path, corpus, bpe_dir, dataset_prefix):
    tok = GPT2BPETokenizer(os.path.join(bpe_dir, "vocab.json"), os.path.join(bpe_dir, "merges.txt"))
    ref = str(tmp_path / "ref")
    megatron_reference(corpus, ref, tok)
    for ext in (".bin", ".idx"):
        assert open(dataset_prefix + ext, "rb").read() == open(ref + ext, "rb").read(), ext


def test_serial_equals_parallel_and_gz_glob(tmp_path, corpus, bpe_flags, dataset_prefix):
    gz = tmp_path / "part.jsonl.gz"
    with open(corpus, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    preprocess("--input", str(tmp_path / "*.jsonl.gz"), "--output-prefix", tmp_path / "serial", "--append-eod",
               "--workers", "1", "--batch-lines", "37", *bpe_flags)
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"serial_text_document{ext}", "rb").read() == open(dataset_prefix + ext, "rb").read()


def test_several_keys_and_empty_text(tmp_path, bpe_flags):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"title": f"Title {i}", "text": "" if i == 1 else f"Body number {i}."})
                             for i in range(3)) + "\n")
    stats = preprocess("--input", src, "--json-keys", "text", "title", "--output-prefix", tmp_path / "out",
                       *bpe_flags)
    assert stats["docs"] == 3
    text, title = IndexedDataset(str(tmp_path / "out_text_document")), IndexedDataset(str(tmp_path / "out_title_document"))
    assert text.num_documents == 3 and len(text) == 2  # the empty text is an empty document
    assert list(text.doc_index) == [0, 1, 1, 2]
    assert title.num_documents == 3 and len(title) == 3


def test_sentence_splitting(tmp_path, bpe_flags):
    assert split_sentences("First one. Second one! Third? yes. End") == ["First one.", "Second one!", "Third? yes.", "End"]
    assert split_sentences("Para one.\n\nPara two.", keep_newlines=True) == ["Para one.\n\n", "Para two."]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "One sentence here. Another sentence there."}) + "\n")
    preprocess("--input", src, "--output-prefix", tmp_path / "s", "--split-sentences", "--append-eod", *bpe_flags)
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    assert len(ds) == 2 and list(ds.doc_index) == [0, 2]


def _bad_corpus(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": broken\n{"text": "fine too"}\n[1, 2]\n')
    return src


def test_malformed_line_stops_with_file_and_line(tmp_path, bpe_flags):
    src = _bad_corpus(tmp_path)
    res = run_module("megalm.tools.preprocess_data", "--input", src, "--output-prefix", tmp_path / "o", *bpe_flags)
    assert res.returncode == 2
    assert f"{src}:2: not valid JSON" in res.stderr and "--skip-bad-lines" in res.stderr
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o_")]  # nothing half-written left behind


def test_skip_bad_lines_reports(tmp_path, bpe_flags):
    src = _bad_corpus(tmp_path)
    res = run_module("megalm.tools.preprocess_data", "--input", src, "--output-prefix", tmp_path / "o",
                     "--skip-bad-lines", *bpe_flags)
    assert res.returncode == 0, res.stderr
    assert f"skipped 2 bad lines; first: {src}:2, {src}:4" in res.stdout
    assert IndexedDataset(str(tmp_path / "o_text_document")).num_documents == 2


def test_missing_key_and_empty_input(tmp_path, bpe_flags):
    src = tmp_path / "nokey.jsonl"
    src.write_text('{"body": "x"}\n')
    res = run_module("megalm.tools.preprocess_data", "--input", src, "--output-prefix", tmp_path / "o", *bpe_flags)
    assert res.returncode == 2 and f"{src}:1: no key 'text'" in res.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = run_module("megalm.tools.preprocess_data", "--input", empty, "--output-prefix", tmp_path / "o", *bpe_flags)
    assert res.returncode == 2 and "no documents found (empty input)" in res.stderr
    res = run_module("megalm.tools.preprocess_data", "--input", tmp_path / "none*.jsonl", "--output-prefix",
                     tmp_path / "o", *bpe_flags)
    assert res.returncode == 2 and "matches no file" in res.stderr


def test_unknown_tokenizer_type(tmp_path, corpus):
    res = run_module("megalm.tools.preprocess_data", "--input", corpus, "--output-prefix", tmp_path / "o",
                     "--tokenizer-type", "MadeUpTokenizer")
    assert res.returncode == 2 and "--tokenizer-type 'MadeUpTokenizer' is unknown" in res.stderr


def test_null_tokenizer_pretokenized(tmp_path):
    src = tmp_path / "ids.jsonl"
    src.write_text('{"text": "1 2 3"}\n{"text": "4 5"}\n')
    preprocess("--input", src, "--output-prefix", tmp_path / "n", "--tokenizer-type", "NullTokenizer",
               "--vocab-size", "10", "--append-eod")
    ds = IndexedDataset(str(tmp_path / "n_text_document"))
    assert [ds[i].tolist() for i in range(2)] == [[1, 2, 3, 10], [4, 5, 10]] and ds.dtype == np.uint16


def test_partitions_resume_after_an_interruption(tmp_path, corpus, bpe_flags):
    """--partitions 3: a bad line in the last part stops the run after two parts are written; after the fix, the
    rerun skips them, and the merged output equals a one-pass run byte for byte."""
    lines = open(corpus).read().splitlines()
    broken = tmp_path / "broken.jsonl"
    bad_at = len(lines) - 3
    broken.write_text("\n".join(lines[:bad_at] + ["{not json"] + lines[bad_at + 1:]) + "\n")
    common = ["--append-eod", "--workers", "2", "--batch-lines", "16", *bpe_flags]
    res = run_module("megalm.tools.preprocess_data", "--input", broken, "--output-prefix", tmp_path / "p",
                     "--partitions", "3", *common)
    assert res.returncode == 2 and f"broken.jsonl:{bad_at + 1}" in res.stderr
    done = sorted(f.name for f in tmp_path.iterdir() if "_part" in f.name)
    assert done == [f"p_part{i:03d}of003_text_document.{ext}" for i in (0, 1) for ext in ("bin", "idx")]
    broken.write_text("\n".join(lines) + "\n")
    res = run_module("megalm.tools.preprocess_data", "--input", broken, "--output-prefix", tmp_path / "p",
                     "--partitions", "3", *common)
    assert res.returncode == 0, res.stderr
    assert "partition 1/3: already done" in res.stderr and "partition 2/3: already done" in res.stderr
    assert not any("_part" in f.name for f in tmp_path.iterdir())
    res = run_module("megalm.tools.preprocess_data", "--input", broken, "--output-prefix", tmp_path / "one", *common)
    assert res.returncode == 0, res.stderr
    for ext in ("bin", "idx"):
        merged, one_pass = tmp_path / f"p_text_document.{ext}", tmp_path / f"one_text_document.{ext}"
        assert merged.read_bytes() == one_pass.read_bytes()


def test_without_compiled_encoder_same_output(tmp_path, corpus, bpe_flags, dataset_prefix, monkeypatch):
    """The `tokenizers` fallback (extension not built) writes the same bytes as the compiled encoder."""
    monkeypatch.setattr("megalm.data.tokenizers._native_byte_bpe", lambda *a, **k: None)
    preprocess("--input", corpus, "--output-prefix", tmp_path / "fallback", "--append-eod", *bpe_flags)
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"fallback_text_document{ext}", "rb").read() == open(dataset_prefix + ext, "rb").read()


def test_unpaired_surrogate_names_the_line(tmp_path, bpe_flags):
    src = tmp_path / "surrogate.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "emoji \\ud83d\\ude00 is a pair"}\n{"text": "half \\ud83d only"}\n')
    res = run_module("megalm.tools.preprocess_data", "--input", src, "--output-prefix", tmp_path / "o", *bpe_flags)
    assert res.returncode == 2 and f"{src}:3: 'text' holds an unpaired surrogate escape" in res.stderr
    res = run_module("megalm.tools.preprocess_data", "--input", src, "--output-prefix", tmp_path / "o",
                     "--skip-bad-lines", *bpe_flags)
    assert res.returncode == 0 and f"skipped 1 bad lines; first: {src}:3" in res.stdout
