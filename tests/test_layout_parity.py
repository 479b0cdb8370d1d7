"""Parallel parity through the real entry point: a short fp32 training under torchrun with a given layout gives
the per-iteration losses (relative error under 1e-5) and final parameters (under 1e-4) of one process."""
import json

import pytest

from conftest import deepspeed_launch, require, tiny_train_flags, torchrun
from parity import assert_close
from megalm.pretrain import main
from megalm.training.checkpoint import read_checkpoint

LLAMA = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
         "--untie-embeddings-and-output-weights", "--num-query-groups", "2", "--disable-bias-linear"]
DEEP = ["--num-layers", "4", "--global-batch-size", "16"]  # 4 layers for 4 stages, 8 micro-batches per step
FLAVOURS = {"gpt2": [], "llama": LLAMA, "llama-eod": LLAMA + ["--eod-mask-loss", "--reset-position-ids"],
            "gpt2-deep": DEEP, "llama-deep": LLAMA + DEEP,
            # today's HF families' options: Qwen2's q/k/v biases, a window on every other layer (GPT-OSS's
            # pattern; Mistral's on all), Llama 3.1's RoPE scaling
            "families-deep": LLAMA + DEEP + ["--add-qkv-bias", "--sliding-window", "8", "--window-attn-skip-freq", "2",
                                             "--use-rope-scaling", "--rope-scaling-original-max-position-embeddings",
                                             "16"]}
PP2 = ["--pipeline-model-parallel-size", "2"]

# name: (processes, flavour, layout flags)
LAYOUTS = {
    "tp2-gpt2": (2, "gpt2", ["--tensor-model-parallel-size", "2"]),
    "tp2-sp-llama": (2, "llama", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "dp2-gpt2": (2, "gpt2", []),
    "tp2-dp2-llama": (4, "llama", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "tp2-sp-llama-eod": (2, "llama-eod", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2-gpt2": (2, "gpt2-deep", PP2),
    "pp4-gpt2": (4, "gpt2-deep", ["--pipeline-model-parallel-size", "4"]),
    "pp2-uneven-llama": (2, "llama-deep", PP2 + ["--pipeline-stage-layers", "3", "1"]),
    "vpp2x2-gpt2": (2, "gpt2-deep", PP2 + ["--num-layers-per-virtual-pipeline-stage", "1"]),
    "vpp2x2-llama-recompute": (2, "llama-deep", PP2 + ["--num-layers-per-virtual-pipeline-stage", "1",
                                                       "--recompute-granularity", "full"]),
    "tp2-pp2-sp-llama": (4, "llama-deep", PP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "tp2-pp2-sp-families": (4, "families-deep", PP2 + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "tp2-pp2-dp2-zero1-gpt2": (8, "gpt2-deep", PP2 + ["--tensor-model-parallel-size", "2", "--zero-stage", "1"]),
    "dp2-zero1-gpt2": (2, "gpt2", ["--zero-stage", "1"]),
    "dp2-zero2-llama": (2, "llama", ["--zero-stage", "2", "--ddp-bucket-size", "5000"]),
    "dp4-gpt2": (4, "gpt2-deep", []),
    "dp4-zero1-gpt2": (4, "gpt2-deep", ["--use-distributed-optimizer"]),
    "dp4-zero2-gpt2": (4, "gpt2-deep", ["--zero-stage", "2", "--ddp-bucket-size", "5000"]),
    "tp2-dp2-zero2-sp-llama": (4, "llama", ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                            "--zero-stage", "2"]),
}


# The key projection's bias cannot change the output (softmax ignores a constant added to all of a query's
# scores), so its gradient is fp32 rounding noise around zero (~1e-11) that Adam normalises into lr-sized steps
# of arbitrary sign: its value legitimately differs between layouts, and it is left out of the comparison.
NO_EFFECT = ".attention.wk.bias"


def rows(path):
    with open(path) as fh:
        return [r for r in map(json.loads, fh) if "loss" in r]


def flag(flags, name, default):
    return int(flags[flags.index(name) + 1]) if name in flags else default


def final_params(save_dir):
    return read_checkpoint(str(save_dir / "iter_0000010"), parts=("model",))["model"]


@pytest.fixture(scope="module")
def single(tmp_path_factory, dataset_prefix, bpe_flags):
    """One-process runs of each flavour, computed once."""
    out = {}
    for flavour, flags in FLAVOURS.items():
        d = tmp_path_factory.mktemp(f"single-{flavour}")
        argv = [str(f) for f in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "10", *flags)]
        assert main(argv + ["--metrics-file", str(d / "m.jsonl"), "--save", str(d / "ck")]) == 0
        out[flavour] = (rows(d / "m.jsonl"), final_params(d / "ck"))
    return out


def assert_matches(layout, ref, got_rows, got_params):
    ref_rows, ref_params = ref
    assert len(got_rows) == len(ref_rows) == 10
    for a, b in zip(ref_rows, got_rows, strict=True):
        assert abs(a["loss"] - b["loss"]) / abs(a["loss"]) < 1e-5, f"{layout} iteration {a['iteration']}"
        assert abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] < 1e-4
    assert set(got_params) == set(ref_params)
    for name, ref_param in ref_params.items():
        if name.endswith(NO_EFFECT):
            continue
        assert_close(got_params[name], ref_param, 1e-4, f"{layout} final {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_one_process(tmp_path, dataset_prefix, bpe_flags, single, layout):
    nproc, flavour, layout_flags = LAYOUTS[layout]
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "10", *FLAVOURS[flavour], *layout_flags)
    res = torchrun(nproc, "megalm/pretrain.py", *flags, "--metrics-file", tmp_path / "m.jsonl",
                   "--save", tmp_path / "ck")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ref_rows = single[flavour][0]
    got = rows(tmp_path / "m.jsonl")
    assert_matches(layout, single[flavour], got, final_params(tmp_path / "ck"))
    pp = flag(layout_flags, "--pipeline-model-parallel-size", 1)
    tp = flag(layout_flags, "--tensor-model-parallel-size", 1)
    dp = nproc // pp // tp
    if dp == nproc > 1 and ("--zero-stage" in layout_flags or "--use-distributed-optimizer" in layout_flags):
        # Adam moments of 1/DP of the parameters (up to the padding that splits each bucket evenly)
        unsharded = ref_rows[0]["optimizer_state_bytes"]
        assert abs(got[0]["optimizer_state_bytes"] - unsharded / dp) <= 8 * dp * 16, (got[0], unsharded)
    if pp > 1 and "--num-layers-per-virtual-pipeline-stage" not in layout_flags:
        # 1F1B: the first stage holds at most P micro-batches of activations, of the m in a step (measured from
        # the tensors autograd keeps alive, not the schedule's own count)
        micro = 16 // 2 // dp
        assert micro > pp and got[0]["pipeline_peak_micro_batches"] == pp, (micro, got[0])


# DeepSpeed's engine under its own launcher: ZeRO 1 and 2 from the flags, ZeRO 3 from an example JSON file, and
# megalm's tensor parallelism inside the engine (Megatron-DeepSpeed's layout), gradient norm included
TP2 = ["--tensor-model-parallel-size", "2"]
DEEPSPEED = {
    "ds-zero1-gpt2": (2, "gpt2", ["--zero-stage", "1"]),
    "ds-zero2-llama": (2, "llama", ["--zero-stage", "2"]),
    "ds-zero3-gpt2": (2, "gpt2", ["--deepspeed_config", "configs/deepspeed/zero3.json"]),
    "ds-tp2-dp2-zero1-gpt2": (4, "gpt2", TP2 + ["--zero-stage", "1"]),
    "ds-tp2-dp2-zero2-llama": (4, "llama", TP2 + ["--zero-stage", "2"]),
    "ds-tp2-dp2-zero3-gpt2": (4, "gpt2", TP2 + ["--deepspeed_config", "configs/deepspeed/zero3.json"]),
    "ds-tp2-sp-dp2-zero1-llama": (4, "llama", TP2 + ["--sequence-parallel", "--zero-stage", "1"]),
    "ds-tp2-sp-dp2-zero3-gpt2": (4, "gpt2", TP2 + ["--sequence-parallel", "--deepspeed_config",
                                                   "configs/deepspeed/zero3.json"]),
}


@pytest.mark.parametrize("layout", DEEPSPEED)
def test_deepspeed_matches_one_process(tmp_path, dataset_prefix, bpe_flags, single, layout):
    require("deepspeed")
    nproc, flavour, layout_flags = DEEPSPEED[layout]
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "10", *FLAVOURS[flavour], "--deepspeed",
                             *layout_flags)
    res = deepspeed_launch(nproc, "megalm/pretrain.py", *flags, "--metrics-file", tmp_path / "m.jsonl",
                           "--save", tmp_path / "ck")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stage = "3" if "zero3" in layout else layout_flags[layout_flags.index("--zero-stage") + 1]
    tp = flag(layout_flags, "--tensor-model-parallel-size", 1)
    assert f"DeepSpeed engine: ZeRO stage {stage} over DP 2, TP {tp}" in res.stdout + res.stderr
    assert_matches(layout, single[flavour], rows(tmp_path / "m.jsonl"), final_params(tmp_path / "ck"))
