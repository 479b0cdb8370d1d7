"""FP8 training through torchao (emulated on the CPU with the same scaling): each recipe tracks bf16; TP 2 + SP
and FSDP2 in FP8 give one process's FP8 run; scales are reduced over the TP group where TP splits a cast's
operand (a run without that reduction does not match); the layers Megatron keeps in high precision stay there;
impossible shapes are refused."""
import json
import re

import pytest
import torch

from conftest import pretrain_run, require, tiny_train_flags, torchrun

BF16 = ["--bf16", "--eval-interval", "100"]


def losses(tmp, dataset_prefix, bpe_flags, nproc, *flags, iters):
    rows, _ = pretrain_run(tmp, nproc, tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", str(iters),
                                                        *BF16, *flags))
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("recipe, fmt", [("tensorwise", "hybrid"), ("rowwise", "e4m3"), ("mxfp8", "hybrid")])
def test_fp8_recipe_tracks_bf16(tmp_path, dataset_prefix, bpe_flags, recipe, fmt):
    """50 iterations: the mean loss over iterations 41..50 within 2% of the bf16 run's (measured: 0.01-0.02%),
    and not the same numbers (the matmuls really are in FP8)."""
    require("torchao.float8")
    ref = losses(tmp_path / "bf16", dataset_prefix, bpe_flags, 1, iters=50)
    got = losses(tmp_path / recipe, dataset_prefix, bpe_flags, 1, "--fp8-format", fmt, "--fp8-recipe", recipe,
                 iters=50)
    mean = [sum(r["loss"] for r in rows[40:50]) / 10 for rows in (ref, got)]
    assert abs(mean[1] - mean[0]) / mean[0] < 0.02, (recipe, mean)
    assert got[0]["loss"] != ref[0]["loss"], "the FP8 run gave the bf16 run's loss: FP8 was not applied"


# one process in FP8 against the same FP8 run under TP 2 + SP and under FSDP2 (bf16, 10 iterations): losses
# within the mixed-precision tolerance of the other bf16 layouts
LAYOUTS = {
    "tp2-sp-tensorwise": (2, ["--fp8-recipe", "tensorwise", "--tensor-model-parallel-size", "2",
                              "--sequence-parallel"]),
    "tp2-sp-rowwise": (2, ["--fp8-recipe", "rowwise", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "fsdp2-tensorwise": (2, ["--fp8-recipe", "tensorwise", "--use-torch-fsdp2"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_layout_matches_one_process(tmp_path, dataset_prefix, bpe_flags, layout):
    require("torchao.float8")
    nproc, flags = LAYOUTS[layout]
    recipe = flags[:2]
    ref = losses(tmp_path / "one", dataset_prefix, bpe_flags, 1, "--fp8-format", "hybrid", *recipe, iters=10)
    got = losses(tmp_path / "many", dataset_prefix, bpe_flags, nproc, "--fp8-format", "hybrid", *flags, iters=10)
    worst = max(abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(ref, got, strict=True))
    assert worst < 1e-4, (layout, worst)


def test_fp8_scales_are_reduced_over_the_tp_group(tmp_path):
    """Column- and row-parallel FP8 matmuls at TP 2 (forward and both gradients, fp32 around the casts) against
    the same matmuls on whole tensors whose TP halves differ in scale. Tensorwise scales reduced over the TP
    group as megalm does give the whole tensors' result to fp32 rounding; each rank's own scale (no reduction)
    is off by ~1e-2, which the check catches. Rowwise scales are powers of 2, so a rank's own scale changes a
    value only where it leaves float8's range (~1e-7 here, still told apart); MXFP8's 32-blocks never straddle
    the split, so they need no reduction and agree either way."""
    require("torchao.float8")
    out = tmp_path / "errors.json"
    res = torchrun(2, "tests/fp8_worker.py", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    errors = json.loads(out.read_text())
    for kind in ("column", "row"):
        assert errors["tensorwise-tp-group"][kind] < 1e-6, errors
        assert errors["tensorwise-own-rank"][kind] > 1e-3, errors
        assert errors["rowwise-tp-group"][kind] < 5e-8, errors
        assert errors["mxfp8-tp-group"][kind] < 5e-8, errors
    assert errors["rowwise-own-rank"]["row"] > 5e-8, errors


def test_fp8_leaves_output_router_experts_and_norms_in_high_precision():
    """Only the blocks' column- and row-parallel linears get FP8; the output layer, the MoE router and experts,
    MLA's replicated down-projections and the norms keep their dtype (Megatron's split)."""
    require("torchao.float8")
    from megalm.config import Config, finalize
    from megalm.model.gpt import GPT
    from megalm.parallel.fp8 import enable_fp8
    from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megalm.parallel.state import Topology

    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 255
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, 32
    m.num_experts, m.moe_router_topk, m.moe_shared_expert_intermediate_size = 4, 2, 32
    m.untie_embeddings_and_output_weights, m.moe_layer_freq = True, "[0,1]"
    model = GPT(finalize(cfg).model, 256, Topology())
    # 2 layers x (q, k, v, o), the dense MLP's two, the shared expert's two
    assert enable_fp8(model, "tensorwise", "hybrid", Topology(), torch.device("cpu")) == 12
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            assert (module.fp8 is not None) == name.startswith("layers."), name
    assert model.output.fp8 is None
    assert not hasattr(model.layers["1"].mlp.router, "fp8") and not hasattr(model.layers["1"].mlp.experts, "fp8")


@pytest.mark.parametrize("argv, message", [
    (["--fp8-format", "hybrid", "--hidden-size", "40", "--num-attention-heads", "4"],
     "--fp8-format with --fp8-recipe tensorwise: --hidden-size is 40 (of 40), not a multiple of 16"),
    (["--fp8-format", "e4m3", "--fp8-recipe", "mxfp8", "--hidden-size", "48", "--num-attention-heads", "4"],
     "--hidden-size is 48 (of 48), not a multiple of 32"),
    (["--fp8-format", "e4m3", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "96",
      "--tensor-model-parallel-size", "4"], "--ffn-hidden-size / TP is 24 (of 96), not a multiple of 16"),
    (["--fp8-recipe", "rowwise"], "--fp8-recipe rowwise needs --fp8-format e4m3 or hybrid"),
])
def test_fp8_refusals(argv, message):
    from megalm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(["--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--seq-length", "32", *argv],
                    world_size=4)


def test_unknown_fp8_recipe_is_refused(capsys):
    from megalm.config import load_config

    with pytest.raises(SystemExit):
        load_config(["--fp8-format", "hybrid", "--fp8-recipe", "delayed"])
    assert "--fp8-recipe: invalid choice: 'delayed'" in capsys.readouterr().err
