"""The configuration's user-facing surface, pinned: every command's ``--help`` text and the message of each refused
flag combination below. ``python tests/config_golden.py`` rewrites ``tests/data/config_golden.json`` from the code
as it is (run it only when a change to a flag or a message is meant); ``tests/test_config.py`` compares."""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "config_golden.json")
NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "100"]
MOE = ["--num-experts", "4"]

# (argv after NULL, world size or None): each breaks one rule
REFUSED = [
    (["--num-layers", "0"], None), (["--hidden-size", "-1"], None), (["--num-attention-heads", "0"], None),
    (["--num-query-groups", "0"], None), (["--seq-length", "0"], None), (["--ffn-hidden-size", "0"], None),
    (["--max-position-embeddings", "0"], None), (["--make-vocab-size-divisible-by", "0"], None),
    (["--micro-batch-size", "0"], None), (["--train-iters", "0"], None), (["--eval-interval", "0"], None),
    (["--log-interval", "0"], None), (["--tensor-model-parallel-size", "0"], None),
    (["--pipeline-model-parallel-size", "0"], None), (["--context-parallel-size", "0"], None),
    (["--num-layers-per-virtual-pipeline-stage", "0"], None), (["--kv-channels", "0"], None),
    (["--hidden-size", "100", "--num-attention-heads", "3"], None),
    (["--num-attention-heads", "4", "--num-query-groups", "3"], None),
    (["--hidden-size", "36", "--num-attention-heads", "4", "--position-embedding-type", "rope"], None),
    (["--seq-length", "256", "--max-position-embeddings", "128"], None),
    (["--hidden-dropout", "1.5"], None), (["--attention-dropout", "-0.1"], None),
    (["--init-method-std", "0"], None),
    (["--recompute-granularity", "full", "--recompute-num-layers", "5"], None),
    (["--peak-tflops", "0"], None),
    (["--tensor-model-parallel-size", "3"], None),
    (["--num-attention-heads", "8", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], None),
    (["--ffn-hidden-size", "255", "--tensor-model-parallel-size", "2"], None),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "127"], None),
    (["--tensor-model-parallel-size", "2"], 3), (["--context-parallel-size", "2"], 3),
    (["--pipeline-model-parallel-size", "4"], 4),
    (["--pipeline-model-parallel-size", "2", "--pipeline-stage-layers", "a", "b"], 2),
    (["--pipeline-model-parallel-size", "2", "--pipeline-stage-layers", "1", "2"], 2),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--pipeline-stage-layers", "2", "2",
      "--num-layers-per-virtual-pipeline-stage", "1"], 2),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"], 2),
    (["--num-layers-per-virtual-pipeline-stage", "1"], None),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], 2),
    (["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--global-batch-size", "12", "--micro-batch-size", "4"], 2),
    (["--cp-comm-type", "p2p", "a2a", "p2p"], None),
    (["--context-parallel-size", "2", "--seq-length", "126"], 2),
    (["--context-parallel-size", "2", "--tensor-model-parallel-size", "4", "--sequence-parallel",
      "--seq-length", "132", "--num-attention-heads", "4"], 8),
    (["--context-parallel-size", "2", "--cp-comm-type", "p2p", "--attention-dropout", "0.1"], 2),
    (["--context-parallel-size", "4", "--cp-comm-type", "a2a", "--num-attention-heads", "2", "--hidden-size", "64"], 4),
    (["--context-parallel-size", "2", "--deepspeed"], 2),
    (["--expert-model-parallel-size", "2"], 2),
    ([*MOE, "--moe-layer-freq", "0"], None), ([*MOE, "--moe-layer-freq", "1 0 1"], None),
    ([*MOE, "--moe-router-topk", "5"], None),
    ([*MOE, "--expert-model-parallel-size", "3"], 3),
    ([*MOE, "--moe-ffn-hidden-size", "255", "--expert-tensor-parallel-size", "2"], 2),
    ([*MOE, "--expert-model-parallel-size", "4"], 2),
    ([*MOE, "--tensor-model-parallel-size", "2"], 2),
    ([*MOE, "--deepspeed"], None),
    ([*MOE, "--moe-router-num-groups", "2"], None),
    ([*MOE, "--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], None),
    ([*MOE, "--moe-router-num-groups", "2", "--moe-router-group-topk", "1", "--moe-router-topk", "3"], None),
    ([*MOE, "--moe-expert-capacity-factor", "0"], None),
    ([*MOE, "--moe-pad-expert-input-to-capacity"], None),
    ([*MOE, "--moe-aux-loss-coeff", "-1"], None),
    ([*MOE, "--moe-shared-expert-intermediate-size", "0"], None),
    ([*MOE, "--moe-shared-expert-intermediate-size", "255", "--tensor-model-parallel-size", "2",
      "--sequence-parallel"], 2),
    (["--use-rope-scaling"], None),
    (["--position-embedding-type", "rope", "--use-rope-scaling", "--rope-scaling-high-freq-factor", "0.5"], None),
    (["--sliding-window", "0"], None),
    (["--rotary-percent", "0.5"], None), (["--position-embedding-type", "rope", "--rotary-percent", "0.1"], None),
    ([*MOE, "--moe-router-topk-scaling-factor", "0"], None),
    (["--rope-type", "yarn"], None),
    (["--softmax-type", "learnable"], None), (["--quick-geglu"], None),
    (["--swiglu", "--activation-func-clamp-value", "0"], None),
    ([*MOE, "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2"], 4),
    (["--window-attn-skip-freq", "2"], None), (["--sliding-window", "8", "--window-attn-skip-freq", "[1,0,1]"], None),
    (["--sliding-window", "8", "--window-attn-skip-freq", "0"], None),
    (["--position-embedding-type", "rope", "--rope-type", "yarn", "--rotary-scaling-factor", "0.5"], None),
    (["--position-embedding-type", "rope", "--rope-type", "yarn", "--use-rope-scaling"], None),
    (["--sliding-window", "8", "--context-parallel-size", "2", "--cp-comm-type", "p2p"], 2),
    (["--multi-latent-attention", "--position-embedding-type", "rope"], None),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--disable-bias-linear",
      "--qk-pos-emb-head-dim", "7"], None),
    (["--multi-latent-attention", "--position-embedding-type", "rope", "--disable-bias-linear",
      "--num-query-groups", "2"], None),
    (["--mtp-num-layers", "1"], None), (["--position-embedding-type", "rope", "--mtp-num-layers", "128"], None),
    (["--bf16", "--fp16"], None), (["--fp16", "--grad-reduce-in-bf16"], None), (["--eval-iters", "-1"], None),
    (["--global-batch-size", "0"], None), (["--micro-batch-size", "3", "--global-batch-size", "8"], None),
    (["--micro-batch-size", "2", "--global-batch-size", "6"], 2),
    (["--lr", "0.001", "--min-lr", "0.01"], None), (["--lr-warmup-iters", "-1"], None),
    (["--lr-warmup-iters", "50", "--lr-decay-iters", "10"], None), (["--ddp-bucket-size", "0"], None),
    (["--loss-scale-window", "0"], None), (["--loss-scale", "0"], None), (["--initial-loss-scale", "-2"], None),
    (["--min-loss-scale", "0"], None), (["--weight-decay", "-1"], None), (["--clip-grad", "-1"], None),
    (["--adam-beta1", "1.0"], None), (["--adam-eps", "0"], None),
    (["--split", "a,b"], None), (["--split", "0,0,0"], None), (["--split", "1,2,3,4"], None),
    (["--data-path", "/nonexistent/prefix"], None), (["--data-path", "0.5", "A", "B"], None),
    (["--data-path", "x", "A", "0.5", "B"], None), (["--data-path", "-1", "A", "0.5", "B"], None),
    (["--train-data-path", "/nonexistent/train"], None),
    (["--valid-data-path", "/nonexistent/valid"], None),
    (["--exit-interval", "0"], None), (["--exit-duration-in-mins", "0"], None),
    (["--distributed-timeout-minutes", "0"], None), (["--max-skipped-steps", "-1"], None),
    (["--hang-timeout-seconds", "-1"], None), (["--loss-spike-factor", "1"], None),
    (["--straggler-exit-factor", "2"], None), (["--iterations-to-skip", "0"], None),
    (["--iterations-to-skip", "x"], None), (["--loss-spike-window", "0"], None),
    (["--bf16", "--grad-reduce-in-bf16", "--deepspeed"], None), (["--zero-stage", "3"], None),
    (["--deepspeed", "--pipeline-model-parallel-size", "2"], 2),
    (["--sft-data", "/nonexistent/sft.jsonl"], None),
    (["--deepspeed_config", "/nonexistent/ds.json"], None),
    (["--deepspeed", "--deepspeed_config", "/nonexistent/ds.json"], None),
    (["--keep-last-n", "0"], None), (["--async-save"], None),
    (["--async-save", "--save", "/tmp/x", "--deepspeed"], None),
    (["--finetune"], None), (["--no-load-optim"], None), (["--save-interval", "0"], None),
    (["--save-interval", "10"], None), (["--load", "/nonexistent/ckpt"], None),
    (["--pretrained-checkpoint", "/nonexistent/ckpt"], None),
    (["--dpo-data", "/nonexistent/pairs.jsonl"], None), (["--sft-data", "README.md", "--dpo-data", "README.md"], None),
    (["--dpo-data", "README.md", "--deepspeed"], None), (["--dpo-reference-file", "/tmp/ref.pt"], None),
    (["--dpo-beta", "0"], None), (["--dpo-loss", "hinge"], None), (["--sft-format", "csv"], None),
    (["--lora-rank", "-1"], None), (["--lora-rank", "4", "--lora-alpha", "0"], None),
    (["--lora-rank", "4", "--lora-dropout", "1"], None), (["--lora-rank", "4", "--lora-target-modules", "qkv"], None),
    (["--lora-rank", "4", "--deepspeed"], None),
    (["--pretrained-checkpoint", "configs", "--deepspeed"], None),
]
# tokenizer rules: argv without NULL
REFUSED_TOKENIZER = [
    ["--tokenizer-type", "GPT2BPETokenizer"],
    ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "/nonexistent/vocab.json", "--merge-file", "m.txt"],
    ["--tokenizer-type", "SentencePieceTokenizer"], ["--tokenizer-type", "HuggingFaceTokenizer"],
    ["--tokenizer-type", "NullTokenizer"], ["--tokenizer-type", "NullTokenizer", "--vocab-size", "0"],
    ["--tokenizer-type", "TikTokenizer"], ["--tokenizer-type", "Llama3Tokenizer"],
    [*NULL, "--sentencepiece-legacy-specials"], [*NULL, "--vocab-extra-ids", "2"],
]
YAML = [  # (YAML text, what it breaks)
    "model: {num_layerz: 2}", "modle: {}", "model: {num_layers: two}", "- a list", "model: {swiglu: 1}",
    "model: {hidden_size: 1.5}", "model: [unclosed",
]


def _help_of(build) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build(["--help"])
    return out.getvalue()


def surface(tmp: str) -> dict:
    """What a user sees: --help of each command, and the message (or exit) of every refused input."""
    import importlib

    from megalm.config import ConfigError, build_parser, load_config

    os.environ["COLUMNS"] = "120"
    result = {"help": {"megalm-pretrain": build_parser().format_help()}, "refused": [], "yaml": []}
    for command, module, function in _entry_points():
        result["help"][command] = _help_of(getattr(importlib.import_module(module), function))
    cases = [([*NULL, *argv], ws) for argv, ws in REFUSED] + [(argv, None) for argv in REFUSED_TOKENIZER]
    for argv, world_size in cases:
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                load_config(argv, world_size=world_size)
            message = "accepted"
        except ConfigError as exc:
            message = str(exc)
        except SystemExit:
            message = "argparse: " + err.getvalue().strip().splitlines()[-1]
        result["refused"].append([argv, world_size, message])
    for i, text in enumerate(YAML):
        path = os.path.join(tmp, f"c{i}.yaml")
        with open(path, "w") as fh:
            fh.write(text)
        try:
            load_config(["--config", path, *NULL])
            message = "accepted"
        except ConfigError as exc:
            message = str(exc).replace(tmp, "TMP")
        result["yaml"].append([text, message])
    return result


def _entry_points() -> list:
    """(command, module, function) of each console script setup.py declares."""
    import re

    setup = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")).read()
    return sorted(re.findall(r'"(megalm-[\w-]+)=([\w.]+):(\w+)"', setup))


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = surface(tmp)
    with open(GOLDEN, "w") as fh:
        json.dump(data, fh, indent=1)
    print(f"wrote {GOLDEN}: {len(data['help'])} help texts, {len(data['refused'])} refused inputs", file=sys.stderr)
