"""Post-training under every layout, through the real entry point: SFT with the chat template, LoRA (on a base
loaded with --pretrained-checkpoint) and DPO each give one process's losses (relative 1e-5) and final trained
weights (1e-4) in fp32 over 10 iterations at TP 2 + SP, PP 2 and DP 2 with ZeRO 1; DPO with LoRA also under
context parallelism (each rank holds part of every completion) and under FSDP2 (the frozen base sharded too), and
LoRA on a mixture of experts' stacks under expert parallelism."""
import json
import random

import pytest

from chat_data import WORDS, tiny_tokenizer
from conftest import torchrun
from parity import assert_close
from megalm.pretrain import main
from megalm.training.checkpoint import read_checkpoint

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--seq-length", "96", "--max-position-embeddings", "96", "--position-embedding-type", "rope",
         "--normalization", "RMSNorm", "--swiglu", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
         "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "10", "--lr", "3e-3",
         "--lr-warmup-iters", "2", "--eval-interval", "5", "--eval-iters", "1", "--split", "90,10,0",
         "--log-interval", "5", "--tokenizer-type", "HuggingFaceTokenizer"]
LORA = ["--lora-rank", "4", "--lora-alpha", "8"]
LAYOUTS = {"tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
           "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
           "dp2-zero1": (2, ["--zero-stage", "1"])}
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
RUNS = {"sft": ("sft", []), "lora": ("sft", LORA), "dpo": ("dpo", []), "dpo-lora": ("dpo", LORA),
        "lora-moe": ("sft", LORA + MOE)}
LAYOUTS["cp2"] = (2, ["--context-parallel-size", "2"])
LAYOUTS["ep2"] = (2, ["--expert-model-parallel-size", "2"])
LAYOUTS["fsdp2"] = (2, ["--use-torch-fsdp2"])
CASES = [(run, layout) for run in ("sft", "lora", "dpo") for layout in ("tp2-sp", "pp2", "dp2-zero1")] + [
    ("dpo-lora", "cp2"), ("lora-moe", "ep2"), ("dpo-lora", "fsdp2")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A Qwen3-style tokenizer, conversations to learn, preference pairs, and a base checkpoint."""
    root = tmp_path_factory.mktemp("posttrain")
    tok = tiny_tokenizer(root / "tok", "qwen3")
    rng = random.Random(0)
    with open(root / "chat.jsonl", "w") as chat, open(root / "pairs.jsonl", "w") as pairs:
        for _ in range(80):
            words = rng.sample(WORDS[:40], 3)
            user = {"role": "user", "content": "reverse " + " ".join(words)}
            answer = {"role": "assistant", "content": " ".join(words[::-1])}
            chat.write(json.dumps({"messages": [user, answer]}) + "\n")
            pairs.write(json.dumps({"prompt": [user], "chosen": [answer],
                                    "rejected": [{"role": "assistant", "content": " ".join(words)}]}) + "\n")
    bases = {}
    for name, extra in (("base", []), ("base-moe", MOE)):
        bases[name] = root / name
        argv = [*MODEL, *extra, "--tokenizer-model", str(tok), "--sft-data", str(root / "chat.jsonl"),
                "--train-iters", "2", "--save", str(bases[name])]
        assert main(argv) == 0
    return root, tok, bases


def flags(setup, run: str) -> list:
    root, tok, bases = setup
    kind, extra = RUNS[run]
    base = bases["base-moe" if "--num-experts" in extra else "base"]
    data = ["--sft-data", root / "chat.jsonl"] if kind == "sft" else ["--dpo-data", root / "pairs.jsonl",
                                                                       "--lr", "1e-2"]
    return [str(f) for f in [*MODEL, "--tokenizer-model", tok, *data, *extra, "--pretrained-checkpoint", base]]


def outcome(folder):
    rows = [r for r in map(json.loads, open(folder / "m.jsonl")) if "loss" in r]
    return rows, read_checkpoint(str(folder / "ck"), parts=("model",))["model"]


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    out = {}
    for run in RUNS:
        d = tmp_path_factory.mktemp(f"single-{run}")
        assert main(flags(setup, run) + ["--metrics-file", str(d / "m.jsonl"), "--save", str(d / "ck")]) == 0
        out[run] = outcome(d)
    return out


@pytest.mark.parametrize("run,layout", CASES)
def test_matches_one_process(setup, single, tmp_path, run, layout):
    nproc, layout_flags = LAYOUTS[layout]
    res = torchrun(nproc, "megalm/pretrain.py", *flags(setup, run), *layout_flags,
                   "--metrics-file", tmp_path / "m.jsonl", "--save", tmp_path / "ck")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (ref_rows, ref_params), (rows, params) = single[run], outcome(tmp_path)
    assert len(rows) == len(ref_rows) == 10
    rewards = [k for k in ref_rows[0] if k.startswith("dpo_")]  # differences of log-probabilities: absolute
    for a, b in zip(ref_rows, rows, strict=True):
        assert abs(a["loss"] - b["loss"]) / a["loss"] < 1e-5, f"{run} {layout} iteration {a['iteration']}"
        for key in rewards:
            assert abs(a[key] - b[key]) < 1e-5, f"{run} {layout} iteration {a['iteration']} {key}"
    assert set(params) == set(ref_params)
    if "lora" in run:  # the checkpoint holds the adapters alone: q k v o and the MLP's (the experts') three
        assert all(".lora." in name for name in params) and len(params) == 2 * 7 * 2
        assert run != "lora-moe" or any("experts.lora.w1" in name for name in params)
    for name, ref in ref_params.items():
        assert_close(params[name], ref, 1e-4, f"{run} {layout} {name}")
    if run.startswith("dpo"):
        assert ref_rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # the policy starts as the reference
        assert rows[-1]["dpo_rewards_accuracy"] > 0.5
    adapters = sum(p.numel() for p in ref_params.values())
    if layout == "dp2-zero1" and run == "lora":  # Adam moments of the adapters only, half on each rank
        assert abs(rows[0]["optimizer_state_bytes"] - 8 * adapters / 2) <= 8 * 16
    if layout == "fsdp2":  # the frozen base is sharded over the 2 ranks, as the adapters and their Adam state
        assert rows[0]["frozen_param_bytes"] * 2 == pytest.approx(ref_rows[0]["frozen_param_bytes"], rel=0.01)
        assert abs(rows[0]["optimizer_state_bytes"] - 8 * adapters / 2) <= 8 * 16
