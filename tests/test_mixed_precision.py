"""Mixed precision as Megatron does it (bf16/fp16 parameters, fp32 gradient buffers, fp32 main parameters and
Adam state sharded by ZeRO), on-device initialisation, and what a checkpoint save allocates."""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, pretrain_run, tiny_train_flags, torchrun
from parity import assert_close
from megalm.pretrain import main
from megalm.tools.plot import read_metrics
from megalm.training.checkpoint import read_checkpoint

LLAMA_DEEP = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--untie-embeddings-and-output-weights", "--num-query-groups", "2", "--disable-bias-linear",
              "--num-layers", "4", "--global-batch-size", "16"]


def metrics(path):
    """The training rows of a --metrics-file (megalm's own reader)."""
    return [r for r in read_metrics(str(path)) if "loss" in r]


def run(tmp, nproc, argv):
    rows, _ = pretrain_run(tmp, nproc, argv)
    return [r for r in rows if "loss" in r], read_checkpoint(str(tmp / "ck"))


LOSS_TOLERANCE = 1e-4  # relative, every iteration; measured 2.3e-5 (bf16), 7.7e-7 (fp16)
# name: (processes, precision and layout flags, relative grad-norm tolerance: about 3x the largest measured
# difference over the 10 iterations, which grows as the runs go: 1.8e-2, 1.6e-3 and 1.2e-1 at iteration 10, where
# summing bf16 gradients in another order moves the norm of a step whose losses still agree to 2e-5)
LAYOUTS = {
    "tp2-pp2-dp2-zero1-bf16": (8, ["--bf16", "--tensor-model-parallel-size", "2", "--sequence-parallel",
                                   "--pipeline-model-parallel-size", "2", "--zero-stage", "1"], 5e-2),
    "dp2-zero2-fp16": (2, ["--fp16", "--zero-stage", "2", "--ddp-bucket-size", "5000"], 5e-3),
    "tp2-dp2-bf16-grad-reduce-in-bf16": (4, ["--bf16", "--grad-reduce-in-bf16", "--tensor-model-parallel-size",
                                             "2", "--zero-stage", "1"], 3e-1),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_layout_matches_one_process(tmp_path, dataset_prefix, bpe_flags, layout, monkeypatch):
    """Per-iteration losses within 1e-4 relative of one process in the same precision over 10 iterations (the
    issue asks 1e-2; measured 2.3e-5 in bf16, 8e-7 in fp16), grad norms within the layout's tolerance (about 3x
    what was measured), and the saved fp32 main parameters within 2e-2
    (measured up to 1.5e-2, on the small residual projections w2 / wo whose 10 Adam steps of lr 3e-3 outweigh
    their initial values: bf16 rounding of differently ordered sums flips the signs of small gradients)."""
    nproc, flags, grad_norm_tolerance = LAYOUTS[layout]
    precision = [f for f in flags if f in ("--bf16", "--fp16", "--grad-reduce-in-bf16")]
    base = tiny_train_flags(dataset_prefix, bpe_flags, *LLAMA_DEEP, "--train-iters", "10", "--eval-interval", "100",
                            "--lr", "3e-3")
    ref, ref_ck = run(tmp_path / "one", 1, base + precision)
    got, got_ck = run(tmp_path / "many", nproc, base + flags)
    assert len(ref) == len(got) == 10
    for key, tol in (("loss", LOSS_TOLERANCE), ("grad_norm", grad_norm_tolerance)):
        worst = max(abs(a[key] - b[key]) / abs(a[key]) for a, b in zip(ref, got, strict=True))
        assert worst < tol, (layout, key, worst)
    for name, state in ref_ck["optimizer"].items():
        assert state["main_param"].dtype.is_floating_point and state["main_param"].element_size() == 4
        assert_close(got_ck["optimizer"][name]["main_param"], state["main_param"], 2e-2, f"{layout} {name}")
        low = ref_ck["model"][name]
        assert low.element_size() == 2 and got_ck["model"][name].dtype == low.dtype
    if nproc == 8:
        check_local_reads(tmp_path / "many" / "ck", got_ck, monkeypatch)


def check_local_reads(folder, whole, monkeypatch):
    """What a TP 2 x PP 2 rank reads to resume from a TP 2 x PP 2 x DP 2 ZeRO 1 checkpoint (loading at TP 1 too):
    only its stage's files are opened, and it gets exactly its part of each whole tensor."""
    import torch

    from megalm.model.gpt import GPT
    from megalm.parallel.layers import shard_of
    from megalm.parallel.state import Topology
    from megalm.pipeline.layout import stage_chunks
    from megalm.training import checkpoint as ckpt

    opened = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: opened.append(os.path.basename(f)) or real_load(f, *a, **k))
    cfg = whole["config"]
    for tp, tp_rank, pp_rank in [(2, 0, 0), (2, 1, 1), (1, 0, 1)]:
        topo = Topology(tp=tp, tp_rank=tp_rank, pp=2, pp_rank=pp_rank, sequence_parallel=tp > 1)
        with torch.device("meta"):
            model = GPT(cfg.model, whole["meta"]["vocab_size"], topo, stage_chunks(cfg.model.num_layers, 2, pp_rank))
        opened.clear()
        mine = ckpt.read_checkpoint(str(folder), ("model", "optimizer"), model, topo)
        assert opened and all(f"-pp{pp_rank:03d}" in f for f in opened), opened
        assert mine["local"] and set(mine["model"]) == {n for n, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            for part, key in (("model", None), ("optimizer", "main_param"), ("optimizer", "exp_avg")):
                full = whole[part][name] if key is None else whole[part][name][key]
                got = mine[part][name] if key is None else mine[part][name][key]
                # what the whole-tensor path cuts for this rank
                assert torch.equal(got, shard_of(ckpt._pad(full, p, topo), p, topo)), (tp, tp_rank, pp_rank, name)


def test_bf16_tracks_fp32(tmp_path, dataset_prefix, bpe_flags):
    """50 iterations: the mean loss of iterations 41..50 in bf16 within 2% of the fp32 run's."""
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "50", "--eval-interval", "1000",
                             "--lr", "3e-3", "--lr-warmup-iters", "5")
    means = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.jsonl"
        assert main(flags + ["--metrics-file", str(out)] + (["--bf16"] if precision == "bf16" else [])) == 0
        means[precision] = sum(r["loss"] for r in metrics(out)[40:50]) / 10
    assert abs(means["bf16"] - means["fp32"]) / means["fp32"] < 0.02, means


def test_bf16_state_bytes_and_exact_resume(tmp_path, dataset_prefix, bpe_flags):
    """DP 2 with ZeRO 1, measured from the tensors each rank holds: parameters 2 bytes per parameter, gradients
    4, main parameters and Adam 12 / DP (fp32: 4 + 4 + 8 / DP). A bf16 run resumed from its checkpoint repeats
    the uninterrupted run's losses and grad norms exactly."""
    from megalm.config import load_config
    from megalm.data.tokenizers import build_tokenizer
    from megalm.model.gpt import GPT

    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", "--global-batch-size", "8",
                             "--eval-interval", "100", "--zero-stage", "1")
    cfg = load_config([str(f) for f in flags])
    n = sum(p.numel() for p in GPT(cfg.model, build_tokenizer(cfg.data).vocab_size).parameters())
    for precision, per_param in (("--bf16", (2, 4, 12 / 2)), ("--fp32", (4, 4, 8 / 2))):
        extra = [precision] if precision != "--fp32" else []
        res = torchrun(2, "megalm/pretrain.py", *flags, *extra, "--save", tmp_path / precision.strip("-"),
                       "--save-interval", "3", "--metrics-file", tmp_path / f"{precision.strip('-')}.jsonl")
        assert res.returncode == 0, res.stderr[-3000:]
        first = metrics(tmp_path / f"{precision.strip('-')}.jsonl")[0]
        got = (first["param_bytes"], first["grad_bytes"], first["main_param_bytes"] + first["optimizer_state_bytes"])
        for measured, bytes_per_param in zip(got, per_param, strict=True):
            assert abs(measured / n - bytes_per_param) < 0.01 * bytes_per_param, (precision, got, n)
    res = torchrun(2, "megalm/pretrain.py", *flags, "--bf16", "--load", tmp_path / "bf16" / "iter_0000003",
                   "--metrics-file", tmp_path / "resumed.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    full, resumed = metrics(tmp_path / "bf16.jsonl"), metrics(tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in full[3:]]
    # another layout (one process) continues from the fp32 main parameters, within bf16 rounding
    one = tmp_path / "one.jsonl"
    assert main(flags + ["--bf16", "--load", str(tmp_path / "bf16" / "iter_0000003"), "--metrics-file",
                         str(one)]) == 0
    assert abs(metrics(one)[0]["loss"] - full[3]["loss"]) / full[3]["loss"] < 1e-2
    # what reads checkpoints reads a bf16 run's: generation (fp32 model, the bf16 values exactly), HF export
    # (bf16 weights, and a config that says so)
    import torch
    from safetensors.torch import load_file

    from megalm.generate import load_for_inference
    from megalm.parallel.state import Topology
    from megalm.interop.hf import export_hf

    folder = str(tmp_path / "bf16" / "iter_0000006")
    saved = read_checkpoint(folder, parts=("model",))["model"]
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    model, _ = load_for_inference(folder, Topology(), {})
    assert all(torch.equal(p[:len(saved[n])], saved[n].float()) for n, p in model.named_parameters())
    exported = export_hf(folder, str(tmp_path / "hf"))
    hf = load_file(os.path.join(exported, "model.safetensors"))
    assert torch.equal(hf["transformer.wte.weight"], saved["embedding.weight"])  # bf16 as trained
    assert json.load(open(os.path.join(exported, "config.json")))["torch_dtype"] == "bfloat16"


STARTUP = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from megalm.config import load_config
from megalm.parallel.state import Topology
from megalm.training.trainer import Trainer

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

cfg = load_config(sys.argv[1:])
with open("/proc/self/statm") as fh:
    base = int(fh.read().split()[1]) * resource.getpagesize()
trainer = Trainer(cfg, Topology())
mem = trainer.optimizer.memory_bytes()
largest = max(t.numel() for t in trainer.model.parameters()) * 4
print(json.dumps(dict(mem, peak=peak() - base, largest_fp32=largest,
                      dtypes=sorted({{str(p.dtype) for p in trainer.model.parameters()}}))))
"""


def test_bf16_start_up_memory_of_a_350m_model(tmp_path, dataset_prefix, bpe_flags):
    """A 350M-parameter GPT (24 layers, width 1024) built by the Trainer in bf16: host memory at its peak during
    construction, initialisation and optimizer set-up, beyond the bf16 parameters, fp32 gradient buffers and
    fp32 main parameters, stays under twice the largest tensor's fp32 bytes (no fp32 copy of the model, no
    model-sized temporary)."""
    script = tmp_path / "startup.py"
    script.write_text(STARTUP.format(root=ROOT))
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--num-layers", "24", "--hidden-size", "1024",
                             "--num-attention-heads", "16", "--seq-length", "1024", "--bf16", "--train-iters", "2",
                             "--eval-iters", "0", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50256")
    res = subprocess.run([sys.executable, str(script), *map(str, flags)], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["dtypes"] == ["torch.bfloat16"]
    assert 3.4e8 < row["param_bytes"] / 2 < 3.7e8, row
    state = row["param_bytes"] + row["grad_bytes"] + row["main_param_bytes"]
    print(row)
    assert row["peak"] - state < 2 * row["largest_fp32"], row


SAVE_PROFILE = """
import json, os, sys
sys.path.insert(0, {root!r})
from torch.profiler import ProfilerActivity, profile
from megalm.training.trainer import Trainer

real = Trainer._save

def _save(self):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        real(self)
    live = peak = 0  # running sum of what was allocated (and freed) in order
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    bucket = max(b.numel for b in self.optimizer.buckets) * 4  # one bucket's fp32 gradients
    with open(os.path.join({out!r}, f"rank{{self.topo.rank}}.json"), "w") as fh:
        json.dump({{"peak": peak, "bucket_bytes": bucket, "state_bytes": sum(self.optimizer.memory_bytes().values()),
                   "staged": self.staging.used if self.staging is not None else 0}}, fh)

Trainer._save = _save
from megalm.pretrain import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("precision, mode", [("--bf16", "sync"), ("--fp32", "sync"), ("--bf16", "async")])
def test_what_a_save_allocates(tmp_path, dataset_prefix, bpe_flags, precision, mode):
    """DP 4 with ZeRO 1 and 20,000-parameter buckets, counted allocation by allocation with the profiler on every
    rank: a save allocates under two buckets (a synchronous one writes the training state where it lives; an async
    one copies it into host memory set aside at start-up); an async save's host snapshot is this rank's share, the
    size of the files it writes (a quarter of the checkpoint, give or take padding); every rank writes a share."""
    out = tmp_path / "profile"
    out.mkdir()
    script = tmp_path / "save.py"
    script.write_text(SAVE_PROFILE.format(root=ROOT, out=str(out)))
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--hidden-size", "64", "--num-layers", "8", "--train-iters",
                             "2", "--global-batch-size", "8", "--eval-interval", "100", "--zero-stage", "1",
                             "--ddp-bucket-size", "20000", *([precision] if precision != "--fp32" else []),
                             *(["--async-save"] if mode == "async" else []))
    res = torchrun(4, script, *flags, "--save", tmp_path / "ck", "--save-interval", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    folder = tmp_path / "ck" / "iter_0000002"
    sizes = {part: [os.path.getsize(folder / (f"{part}-tp00-pp000" + (f"-dp{r:05d}" if r else "") + ".pt"))
                    for r in range(4)] for part in ("model", "optimizer")}
    for part, per_rank in sizes.items():
        assert max(per_rank) < 1.5 * min(per_rank), (part, per_rank)
    for rank in range(4):
        row = json.load(open(out / f"rank{rank}.json"))
        assert row["peak"] < 2 * row["bucket_bytes"] < row["state_bytes"] / 2, (rank, row)
        share = sizes["model"][rank] + sizes["optimizer"][rank]
        assert (0.8 * share < row["staged"] < 1.2 * share) if mode == "async" else row["staged"] == 0, (rank, row)
    whole = read_checkpoint(str(folder))
    assert all(math.isfinite(float(t.float().abs().max())) for t in whole["model"].values())
