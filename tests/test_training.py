"""pretrain end to end on the fixture corpus: metrics, validation, exact resume, precision modes, bad input."""
import json
import math
import os

import pytest

from conftest import run_module, tiny_train_flags
from megalm.pretrain import main as _main


def main(argv):
    return _main([str(a) for a in argv])


def read_metrics(path):
    with open(path) as fh:
        rows = [json.loads(line) for line in fh]
    return [r for r in rows if "loss" in r], [r for r in rows if "valid_loss" in r]


def test_train_logs_metrics_and_tensorboard(tmp_path, dataset_prefix, bpe_flags):
    metrics = tmp_path / "m.jsonl"
    assert main(tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "8", "--metrics-file", metrics,
                                 "--tensorboard-dir", tmp_path / "tb", "--peak-tflops", "0.5")) == 0
    train, valid = read_metrics(metrics)
    assert [r["iteration"] for r in train] == list(range(1, 9))
    assert {"iteration", "loss", "lr", "grad_norm", "tokens_per_sec", "ms_per_iter", "tflops_per_device",
            "mfu"} <= set(train[0])
    assert train[0]["mfu"] == pytest.approx(train[0]["tflops_per_device"] / 0.5)
    assert [r["iteration"] for r in valid] == [4, 8] and all("valid_ppl" in r for r in valid)
    assert train[-1]["loss"] < train[0]["loss"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_timing_breakdown(tmp_path, dataset_prefix, bpe_flags, caplog):
    """--timing-log-level 1: every row holds the step's phases, which fit inside the step's time; a save's
    blocking time comes with the iteration after it; the progress line shows them. Level 0 adds nothing."""
    import logging

    metrics = tmp_path / "m.jsonl"
    with caplog.at_level(logging.INFO, logger="megalm"):
        assert main(tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", "--metrics-file", metrics,
                                     "--timing-log-level", "1", "--save", tmp_path / "ck", "--save-interval",
                                     "3")) == 0
    train, _ = read_metrics(metrics)
    phases = ("time_data_ms", "time_forward_backward_ms", "time_grads_reduce_ms", "time_optimizer_ms")
    for row in train:
        assert all(row[k] >= 0 for k in phases)
        assert sum(row[k] for k in phases) <= row["ms_per_iter"] * 1.05 + 1
        assert row["time_forward_backward_ms"] > row["time_optimizer_ms"] * 0.1
    assert ["time_checkpoint_ms" in r for r in train] == [False, False, False, True, False, False]
    assert train[3]["time_checkpoint_ms"] > 0
    assert any("ms: data " in r.getMessage() and "forward-backward" in r.getMessage() for r in caplog.records)
    assert main(tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "2", "--metrics-file",
                                 tmp_path / "off.jsonl")) == 0
    assert not any(k.startswith("time_") for r in read_metrics(tmp_path / "off.jsonl")[0] for k in r)


def test_exact_resume(tmp_path, dataset_prefix, bpe_flags):
    full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", "--hidden-dropout", "0.1")
    assert main(flags + ["--save", tmp_path / "a", "--save-interval", "3", "--metrics-file", full]) == 0
    assert open(tmp_path / "a" / "latest_checkpointed_iteration.txt").read() == "6"
    assert main(flags + ["--load", tmp_path / "a" / "iter_0000003", "--metrics-file", resumed]) == 0
    a, _ = read_metrics(full)
    b, _ = read_metrics(resumed)
    assert [r["iteration"] for r in b] == [4, 5, 6]
    assert [r["loss"] for r in b] == [r["loss"] for r in a[3:]]  # bitwise: same data, weights, Adam state, RNG
    assert [r["grad_norm"] for r in b] == [r["grad_norm"] for r in a[3:]]


def test_exact_resume_with_dropout_on_every_rank(tmp_path, dataset_prefix, bpe_flags):
    """TP 2 x PP 2 x DP 2 with hidden and attention dropout, stopped at iteration 3 and resumed: bitwise the
    uninterrupted run, because every rank gets back its own random streams (pipeline stages draw different
    amounts; attention dropout draws from a generator per TP rank). Failed when only rank 0's state was saved."""
    from conftest import torchrun

    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "5", "--num-layers", "4",
                             "--global-batch-size", "8", "--eval-interval", "100", "--hidden-dropout", "0.1",
                             "--attention-dropout", "0.1", "--tensor-model-parallel-size", "2",
                             "--pipeline-model-parallel-size", "2")
    res = torchrun(8, "megalm/pretrain.py", *flags, "--save", tmp_path / "a", "--save-interval", "3",
                   "--metrics-file", tmp_path / "full.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    res = torchrun(8, "megalm/pretrain.py", *flags, "--load", tmp_path / "a" / "iter_0000003",
                   "--metrics-file", tmp_path / "resumed.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    a, _ = read_metrics(tmp_path / "full.jsonl")
    b, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in b] == [4, 5]
    assert [(r["loss"], r["grad_norm"]) for r in b] == [(r["loss"], r["grad_norm"]) for r in a[3:]]


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_mixed_precision_trains(tmp_path, dataset_prefix, bpe_flags, precision):
    metrics = tmp_path / "m.jsonl"
    assert main(tiny_train_flags(dataset_prefix, bpe_flags, precision, "--train-iters", "12", "--lr", "3e-3",
                                 "--metrics-file", metrics)) == 0
    train, _ = read_metrics(metrics)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]


def test_checkpoint_errors(tmp_path, dataset_prefix, bpe_flags):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "2")
    assert main(flags + ["--save", tmp_path / "c"]) == 0
    res = run_module("megalm.pretrain", *flags, "--load", tmp_path / "c", "--hidden-size", "64")
    assert res.returncode == 2 and "model config differs from this run in ffn_hidden_size" in res.stderr
    model_pt = tmp_path / "c" / "iter_0000002" / "model-tp00-pp000.pt"
    original = model_pt.read_bytes()
    data = bytearray(original)
    data[-100] ^= 0xFF
    model_pt.write_bytes(bytes(data))
    res = run_module("megalm.pretrain", *flags, "--load", tmp_path / "c", "--save", tmp_path / "c")
    assert res.returncode == 2 and "model-tp00-pp000.pt: checksum mismatch" in res.stderr
    assert model_pt.read_bytes() == bytes(data)  # nothing overwritten
    model_pt.write_bytes(original)
    (tmp_path / "c" / "iter_0000002" / "optimizer-tp00-pp000.pt").unlink()
    res = run_module("megalm.pretrain", *flags, "--load", tmp_path / "c")
    assert res.returncode == 2 and "optimizer-tp00-pp000.pt: missing from the checkpoint" in res.stderr


def test_bad_input_errors(tmp_path, dataset_prefix, bpe_flags):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "2")
    res = run_module("megalm.pretrain", *flags, "--data-path", tmp_path / "missing_text_document")
    assert res.returncode == 2 and "missing_text_document.idx does not exist" in res.stderr
    res = run_module("megalm.pretrain", *flags, "--hidden-size", "30")
    assert res.returncode == 2 and "--hidden-size 30 is not divisible by --num-attention-heads 4" in res.stderr
    res = run_module("megalm.pretrain", *flags, "--tokenizer-type", "WordPiece")
    assert res.returncode == 2 and "invalid choice: 'WordPiece'" in res.stderr
    no_data = [f for f in flags if f != dataset_prefix and f != "--data-path"]
    res = run_module("megalm.pretrain", *no_data)
    assert res.returncode == 2 and "--data-path is required" in res.stderr
    res = run_module("megalm.pretrain", *flags, "--split", "100,0,0", "--seq-length", "32")
    assert res.returncode == 0, res.stderr  # no validation split: training runs without validation


def test_runs_without_the_extension(tmp_path, dataset_prefix, bpe_flags):
    """Pure PyTorch/numpy fallbacks: same losses as with megalm._C, and the log says so once."""
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "3", "--attention-backend", "fused",
                             "--data-cache-path", tmp_path / "cache")
    res = run_module("megalm.pretrain", *flags, "--metrics-file", tmp_path / "fallback.jsonl",
                     env={"MEGALM_DISABLE_EXTENSION": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("megalm._C disabled") == 1
    assert "fused softmax: using the torch reference (megalm._C is not built)" in res.stdout
    assert main(flags + ["--metrics-file", tmp_path / "ext.jsonl", "--data-cache-path", tmp_path / "cache2"]) == 0
    fallback, _ = read_metrics(tmp_path / "fallback.jsonl")
    ext, _ = read_metrics(tmp_path / "ext.jsonl")
    for a, b in zip(fallback, ext, strict=True):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-5


@pytest.mark.parametrize("flavour", [[], ["--position-embedding-type", "rope", "--normalization", "RMSNorm"]],
                         ids=["learned", "rope"])
def test_eod_mask_and_position_reset_train(tmp_path, dataset_prefix, bpe_flags, flavour):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "8", *flavour)
    assert main(flags + ["--metrics-file", tmp_path / "plain.jsonl"]) == 0
    assert main(flags + ["--eod-mask-loss", "--reset-position-ids", "--metrics-file", tmp_path / "eod.jsonl"]) == 0
    plain, _ = read_metrics(tmp_path / "plain.jsonl")
    eod, _ = read_metrics(tmp_path / "eod.jsonl")
    assert all(r["loss"] == r["loss"] for r in eod)
    # the options reach the loss once a batch holds an end of document (batches of 132 tokens, documents ~250)
    assert [r["loss"] for r in plain] != [r["loss"] for r in eod]


def test_fp16_skips_a_step_with_an_inf_gradient(dataset_prefix, bpe_flags):
    """An overflowed gradient: the step is skipped on the update, the loss scale halves, training goes on."""
    import torch

    from megalm.config import load_config
    from megalm.parallel.state import Topology
    from megalm.training.trainer import Trainer

    cfg = load_config([str(a) for a in tiny_train_flags(dataset_prefix, bpe_flags, "--fp16", "--train-iters", "4")])
    trainer = Trainer(cfg, Topology())

    def step():
        out = trainer.train_step(trainer._micro_batches(trainer.train_ds, trainer.consumed_samples))
        trainer.iteration += 1
        trainer.consumed_samples += cfg.train.global_batch_size
        return out

    assert not step()["skipped"]
    scale = trainer.scaler.scale
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    victim = trainer.model.layers["0"].mlp.w2.weight
    handle = victim.register_hook(lambda g: g * float("inf"))
    bad = step()
    handle.remove()
    assert bad["skipped"] == 1 and not math.isfinite(bad["grad_norm"])
    assert trainer.scaler.scale == scale / 2
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    good = step()
    assert not good["skipped"] and math.isfinite(good["loss"])
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_resume_under_other_layouts(tmp_path, dataset_prefix, bpe_flags):
    """Saved at TP 2 x PP 2 x DP 2 with ZeRO 1, continued at TP 1 x PP 1 x DP 1, at PP 4, and at DP 4 with ZeRO 2
    (weights and Adam state resharded on load, no conversion step): the losses of the uninterrupted run."""
    from conftest import torchrun

    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", "--num-layers", "4",
                             "--global-batch-size", "8", "--eval-interval", "100")
    assert main(flags + ["--metrics-file", tmp_path / "ref.jsonl"]) == 0
    res = torchrun(8, "megalm/pretrain.py", *flags, "--tensor-model-parallel-size", "2",
                   "--pipeline-model-parallel-size", "2", "--zero-stage", "1", "--save", tmp_path / "a",
                   "--save-interval", "3")
    assert res.returncode == 0, res.stderr[-3000:]
    ref, _ = read_metrics(tmp_path / "ref.jsonl")
    layouts = {"single": (1, []), "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
               "dp4-zero2": (4, ["--zero-stage", "2"])}
    for name, (nproc, layout) in layouts.items():
        args = [*flags, *layout, "--load", tmp_path / "a" / "iter_0000003",
                "--metrics-file", tmp_path / f"{name}.jsonl"]
        if nproc == 1:
            assert main(args) == 0
        else:
            res = torchrun(nproc, "megalm/pretrain.py", *args)
            assert res.returncode == 0, res.stderr[-3000:]
        got, _ = read_metrics(tmp_path / f"{name}.jsonl")
        assert [r["iteration"] for r in got] == [4, 5, 6]
        for x, y in zip(ref[3:], got, strict=True):
            assert abs(x["loss"] - y["loss"]) / x["loss"] < 1e-6, (name, x["iteration"], x["loss"], y["loss"])


def test_every_rank_writes_its_zero_slice(tmp_path, dataset_prefix, bpe_flags):
    """DP 4 with ZeRO 1: each rank writes its own slice of the parameters and of the Adam state (nothing gathered
    to one rank), a quarter each give or take a bucket's padding; the index says where each slice lies; the
    checkpoint resumes exactly at DP 4, and one process continues it with the DP 4 run's iteration-3 loss and grad
    norm."""
    from conftest import torchrun
    from megalm.training.checkpoint import read_checkpoint

    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "4", "--global-batch-size", "8",
                             "--eval-interval", "100", "--zero-stage", "1")
    res = torchrun(4, "megalm/pretrain.py", *flags, "--save", tmp_path / "a", "--save-interval", "2",
                   "--metrics-file", tmp_path / "full.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "a" / "iter_0000002"
    for part in ("model", "optimizer"):
        files = [f"{part}-tp00-pp000.pt"] + [f"{part}-tp00-pp000-dp{r:05d}.pt" for r in (1, 2, 3)]
        sizes = [os.path.getsize(folder / f) for f in files]
        assert max(sizes) < 1.5 * min(sizes), (part, sizes)
    meta = json.load(open(folder / "meta.json"))
    assert meta["format"] == 2 and meta["shards"]["optimizer_slices"] and meta["shards"]["model_slices"]
    assert not meta["shards"]["optimizer"] and not meta["shards"]["model"]
    whole = read_checkpoint(str(folder))
    assert all(whole["optimizer"][n]["exp_avg"].shape == t.shape for n, t in whole["model"].items())
    res = torchrun(4, "megalm/pretrain.py", *flags, "--load", folder, "--metrics-file", tmp_path / "resumed.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    full, _ = read_metrics(tmp_path / "full.jsonl")
    resumed, _ = read_metrics(tmp_path / "resumed.jsonl")
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in full[2:]]
    # one process continues the DP 4 run: its iteration 3 is the DP 4 run's, up to the order of the sums
    assert main(tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "3", "--global-batch-size", "8",
                                 "--load", folder, "--metrics-file", tmp_path / "one.jsonl")) == 0
    one, _ = read_metrics(tmp_path / "one.jsonl")
    assert [r["iteration"] for r in one] == [3]
    assert abs(one[0]["loss"] - full[2]["loss"]) <= 1e-5 * full[2]["loss"]
    assert abs(one[0]["grad_norm"] - full[2]["grad_norm"]) <= 1e-4 * full[2]["grad_norm"]


def test_finetune_no_load_optim_and_keep_last_n(tmp_path, dataset_prefix, bpe_flags):
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "4")
    assert main(flags + ["--save", tmp_path / "a", "--save-interval", "1", "--keep-last-n", "2"]) == 0
    assert sorted(os.listdir(tmp_path / "a")) == ["iter_0000003", "iter_0000004", "latest_checkpointed_iteration.txt"]
    # --finetune: weights only, from iteration 0 (four more iterations here)
    assert main(flags + ["--load", tmp_path / "a", "--finetune", "--metrics-file", tmp_path / "ft.jsonl"]) == 0
    ft, _ = read_metrics(tmp_path / "ft.jsonl")
    assert [r["iteration"] for r in ft] == [1, 2, 3, 4]
    # --no-load-optim: progress resumes, Adam starts afresh, so iteration 4's loss is the same but not its update
    extra = ["--train-iters", "5", "--metrics-file"]
    assert main(flags + ["--load", tmp_path / "a" / "iter_0000003", *extra, tmp_path / "full.jsonl"]) == 0
    assert main(flags + ["--load", tmp_path / "a" / "iter_0000003", "--no-load-optim", *extra,
                         tmp_path / "fresh.jsonl"]) == 0
    full, _ = read_metrics(tmp_path / "full.jsonl")
    fresh, _ = read_metrics(tmp_path / "fresh.jsonl")
    assert full[0]["iteration"] == fresh[0]["iteration"] == 4 and full[0]["loss"] == fresh[0]["loss"]
    assert full[1]["loss"] != fresh[1]["loss"]


def test_token_ids_outside_the_vocabulary_stop_the_run(tmp_path):
    """An id between the vocabulary and its padding, and one past the padding, each stop the run at start-up with
    the file and the id (before: trained padding rows silently, or an IndexError deep in the embedding)."""
    import numpy as np

    from megalm.data.indexed import IndexedDatasetWriter

    flags = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--num-layers", "1", "--hidden-size", "16",
             "--num-attention-heads", "2", "--seq-length", "8", "--micro-batch-size", "1", "--global-batch-size", "1",
             "--train-iters", "1", "--eval-iters", "0", "--split", "100,0,0"]
    for bad in (101, 130, 5000):  # NullTokenizer's vocabulary is 101 ids (100 + its end of document); padded 128
        prefix = str(tmp_path / f"d{bad}")
        writer = IndexedDatasetWriter(prefix, dtype=np.int32)
        rng = np.random.RandomState(0)
        for i in range(20):
            doc = rng.randint(0, 100, size=30)
            if i == 7:
                doc[3] = bad
            writer.add_document(doc)
        writer.finalize()
        res = run_module("megalm.pretrain", *flags, "--data-path", prefix)
        assert res.returncode == 2, res.stderr[-2000:]
        assert f"d{bad}.bin: token id {bad} is outside the tokenizer's vocabulary of 101 ids" in res.stderr


def test_index_cache_follows_the_data(tmp_path):
    """A dataset written again with the same document count but other contents gets fresh indices, not the cached
    ones of the old version (the key holds the files' sizes, times and a hash of the index)."""
    import numpy as np

    from megalm.data.gpt_dataset import GPTDataset, IndexCache
    from megalm.data.indexed import IndexedDataset, IndexedDatasetWriter

    prefix, cache = str(tmp_path / "d"), IndexCache(str(tmp_path / "cache"))
    samples = []
    for length in (30, 50):
        writer = IndexedDatasetWriter(prefix, dtype=np.int32)
        for i in range(20):
            writer.add_document(np.arange(length) + i)
        writer.finalize()
        ds = IndexedDataset(prefix)
        gpt = GPTDataset(ds, np.arange(20, dtype=np.int32), 10, 16, 1, "train", "null", cache)
        samples.append([gpt[i].tolist() for i in range(10)])
        fresh = GPTDataset(ds, np.arange(20, dtype=np.int32), 10, 16, 1, "train", "null",
                           IndexCache(str(tmp_path / f"fresh{length}")))
        assert samples[-1] == [fresh[i].tolist() for i in range(10)]
    assert samples[0] != samples[1]
