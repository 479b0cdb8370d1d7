"""megalm-estimate against Megatron's published model sizes, against measured per-rank state on CPU runs, and
its activation formula against the tensors megalm's layers actually keep for backward."""
import dataclasses
import json

import pytest
import torch

from conftest import run_module, tiny_train_flags, torchrun
from megalm.config import Config, finalize, load_config
from megalm.model.gpt import GPT
from megalm.tools.estimate import activation_units_per_layer, all_to_all_bytes, estimate, total_parameters

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "51199"]

# Narayanan et al. 2021 (Megatron-LM), Table 1: parameters (billions), layers, hidden, heads; vocab 51200, seq 2048
PUBLISHED = [(1.7, 24, 2304, 24), (7.5, 36, 4096, 32), (39.1, 48, 8192, 64), (145.6, 80, 12288, 96),
             (529.6, 105, 20480, 128), (1008.0, 128, 25600, 160)]


@pytest.mark.parametrize("billions, layers, hidden, heads", PUBLISHED)
def test_parameter_counts_match_megatron_published_models(billions, layers, hidden, heads):
    cfg = load_config([*NULL, "--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads",
                       str(heads), "--seq-length", "2048"])
    ours = total_parameters(cfg, 51200)
    # the paper's count: 12 l h^2 (1 + 13 / (12 h) + (V + s) / (12 l h)), rounded to 0.1B in its table
    paper = 12 * layers * hidden ** 2 * (1 + 13 / (12 * hidden) + (51200 + 2048) / (12 * layers * hidden))
    assert abs(ours - paper) / paper < 1e-3
    assert round(ours / 1e9, 1) == pytest.approx(billions, abs=0.051)


def test_cli_prints_every_stage():
    res = run_module("megalm.tools.estimate", "--world-size", "1024", "--padded-vocab", "51200", "--num-layers",
                     "96", "--hidden-size", "12288", "--num-attention-heads", "96", "--seq-length", "2048",
                     "--micro-batch-size", "1", "--global-batch-size", "1536", "--tensor-model-parallel-size", "8",
                     "--pipeline-model-parallel-size", "16", "--sequence-parallel", "--bf16", "--zero-stage", "1")
    assert res.returncode == 0, res.stderr
    assert "174.6" in res.stdout and "TP 8 x PP 16 x DP 8" in res.stdout
    assert len([line for line in res.stdout.splitlines() if line.strip()[:2].strip().isdigit()]) == 16


def test_cli_with_context_parallelism():
    """A trainer flag whose value equals --world-size reaches the trainer (it used to be dropped with it); the
    ring's traffic per step: 12 kv per layer and micro-batch at CP 2 in bf16 (kv = 1 x 8 x 2048 x 32 x 2 bytes),
    2 layers x 2 micro-batches = 48 MiB."""
    res = run_module("megalm.tools.estimate", "--world-size", "8", "--padded-vocab", "51200", "--num-layers", "2",
                     "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "4096",
                     "--micro-batch-size", "1", "--global-batch-size", "8", "--context-parallel-size", "2",
                     "--cp-comm-type", "p2p", "--bf16")
    assert res.returncode == 0, res.stderr
    assert "CP 2 x DP 4" in res.stdout and "2 micro-batches of 1" in res.stdout
    assert f"CP 2, p2p; {48 / 1024:.2f} GiB to torch.distributed per step" in res.stdout


def test_state_bytes_match_a_measured_run(tmp_path, dataset_prefix, bpe_flags):
    """PP 2 x DP 2 with ZeRO 1 in bf16 on CPU: rank 0's parameter, gradient and optimizer (fp32 main parameters
    and Adam) bytes after the first step."""
    flags = [str(f) for f in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "2", "--num-layers", "4",
                                               "--global-batch-size", "8", "--pipeline-model-parallel-size", "2",
                                               "--zero-stage", "1", "--bf16")]
    res = torchrun(4, "megalm/pretrain.py", *flags, "--metrics-file", tmp_path / "m.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(open(tmp_path / "m.jsonl").readline())
    cfg = load_config(flags, world_size=4)
    stage0 = estimate(cfg, 4, 1024)[0]
    measured["optimizer_state_bytes"] += measured["main_param_bytes"]
    for key, value in (("param_bytes", stage0.param_bytes), ("grad_bytes", stage0.grad_bytes),
                       ("optimizer_state_bytes", stage0.optimizer_bytes)):
        assert abs(value - measured[key]) / measured[key] < 0.15, (key, value, measured[key])


def test_moe_state_bytes_match_a_measured_run(tmp_path, dataset_prefix, bpe_flags):
    """EP 2 over DP 4 with ZeRO 1 (experts sharded over their 2 expert-data-parallel ranks, the rest over 4):
    rank 0's parameter, gradient and Adam bytes after the first step, measured from the tensors it holds."""
    flags = [str(f) for f in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "2", "--global-batch-size",
                                               "8", "--num-experts", "4", "--moe-ffn-hidden-size", "96",
                                               "--expert-model-parallel-size", "2", "--zero-stage", "1")]
    res = torchrun(4, "megalm/pretrain.py", *flags, "--metrics-file", tmp_path / "m.jsonl")
    assert res.returncode == 0, res.stderr[-3000:]
    measured = json.loads(open(tmp_path / "m.jsonl").readline())
    stage0 = estimate(load_config(flags, world_size=4), 4, 1024)[0]
    # 2 of 4 experts, 2 layers: 2 matrices and (biases on, as Megatron's experts) their 2 biases each
    assert stage0.expert_parameters == 2 * 2 * (2 * 32 * 96 + 96 + 32)
    for key, value in (("param_bytes", stage0.param_bytes), ("grad_bytes", stage0.grad_bytes),
                       ("optimizer_state_bytes", stage0.optimizer_bytes)):
        assert abs(value - measured[key]) / measured[key] < 0.05, (key, value, measured[key])


def saved_activation_bytes(cfg, layers):
    """Bytes of the distinct non-parameter tensors autograd keeps while running ``layers`` layers."""
    model = GPT(cfg.model, 1000)
    model.init_weights(0)
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    x = model.embedding(torch.randint(0, 999, (cfg.train.micro_batch_size, cfg.model.seq_length))).detach()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for i in range(layers):
            x = model.layers[str(i)](x.requires_grad_() if i == 0 else x)
    return total[0]


@pytest.mark.parametrize("flavour", [{}, dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                                              num_query_groups=2, add_bias_linear=False),
                                     dict(attention_backend="unfused"),
                                     dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                                          add_bias_linear=False, num_experts=4, moe_router_topk=2,
                                          moe_ffn_hidden_size=192, moe_layer_freq="[1,0,1]"),
                                     dict(num_experts=8, moe_router_topk=1, moe_ffn_hidden_size=256),
                                     dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                                          add_bias_linear=False, multi_latent_attention=True, q_lora_rank=64,
                                          kv_lora_rank=32, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=24)],
                         ids=["gpt2", "llama-gqa", "unfused", "moe-swiglu", "moe-gelu", "mla"])
def test_activation_formula_matches_saved_tensors(flavour):
    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 999
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads = 3, 128, 8
    cfg.model.seq_length, cfg.train.micro_batch_size = 256, 2
    for k, v in flavour.items():
        setattr(cfg.model, k, v)
    finalize(cfg)
    measured = saved_activation_bytes(cfg, 3)
    sbh = 256 * 2 * 128
    predicted = sum(activation_units_per_layer(cfg, moe) for moe in cfg.model.moe_layers()) * sbh * 4
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


@pytest.mark.parametrize("name, layers, hidden, ffn, moe_ffn, experts, dense, published", [
    ("glm4.5", 92, 5120, 12288, 1536, 160, 3, 355e9), ("glm4.5_air", 46, 4096, 10944, 1408, 128, 1, 106e9)])
def test_glm_configs_count_what_transformers_builds(name, layers, hidden, ffn, moe_ffn, experts, dense, published):
    """configs/glm4.5*.yaml at their real sizes: megalm counts, less its multi-token prediction layer, exactly the
    parameters transformers' Glm4Moe of the same config.json holds (built on the meta device; it drops that
    layer), which is the published size (within 1.5%; the published figure leaves that layer out too)."""
    import os

    from conftest import require

    transformers = require("transformers")
    cfg = load_config(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml"), *NULL])
    ours = total_parameters(cfg, 151552)
    main = total_parameters(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mtp_num_layers=None)),
                            151552)
    hf_config = transformers.Glm4MoeConfig(
        vocab_size=151552, hidden_size=hidden, intermediate_size=ffn, moe_intermediate_size=moe_ffn,
        num_hidden_layers=layers, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        n_routed_experts=experts, n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=dense,
        attention_bias=True, use_qk_norm=name == "glm4.5", partial_rotary_factor=0.5, n_group=1, topk_group=1)
    with torch.device("meta"):
        theirs = transformers.Glm4MoeForCausalLM(hf_config)
    count = sum(p.numel() for p in theirs.parameters()) + sum(b.numel() for n, b in theirs.named_buffers()
                                                              if "e_score_correction_bias" in n)
    assert ours > main == count, (main, count)
    assert abs(main - published) / published < 0.015


@pytest.mark.parametrize("name, layers, experts, published", [("gpt_oss_20b", 24, 32, 20.9e9),
                                                              ("gpt_oss_120b", 36, 128, 116.8e9)])
def test_gpt_oss_configs_count_what_transformers_builds(name, layers, experts, published):
    """configs/gpt_oss_*.yaml at their real sizes: exactly the parameters transformers' GptOss of the same
    config.json holds (meta device), which is the published size (20.9B, 116.8B) within 1%."""
    import os

    from conftest import require

    transformers = require("transformers")
    cfg = load_config(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml"), *NULL])
    ours = total_parameters(cfg, 201088)
    with torch.device("meta"):
        theirs = transformers.GptOssForCausalLM(transformers.GptOssConfig(
            num_hidden_layers=layers, num_local_experts=experts, vocab_size=201088, hidden_size=2880,
            intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
            num_experts_per_tok=4))
    assert ours == sum(p.numel() for p in theirs.parameters())
    assert abs(ours - published) / published < 0.01


@pytest.mark.parametrize("name, vocab, heads, experts, dense, groups, published", [
    ("deepseek_v3", 129280, 128, 256, 3, (8, 4), 671e9), ("kimi_k2", 163840, 64, 384, 1, (1, 1), 1.04e12)])
def test_deepseek_configs_count_what_transformers_builds(name, vocab, heads, experts, dense, groups, published):
    """configs/deepseek_v3.yaml and kimi_k2.yaml at their real sizes: without the multi-token prediction module,
    exactly the parameters transformers' DeepseekV3 of the same config.json holds (meta device), the published
    main-model size (671B; Kimi K2's 1.04T) within 1.5%; with DeepSeek-V3's module and the copies of the embedding
    and output layer its files repeat, the files' 685B."""
    import os

    from conftest import require

    transformers = require("transformers")
    cfg = load_config(["--config", os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml"), *NULL])
    ours = total_parameters(cfg, vocab)
    main = total_parameters(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mtp_num_layers=None)),
                            vocab)
    with torch.device("meta"):
        theirs = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=heads, n_routed_experts=experts,
            first_k_dense_replace=dense, n_group=groups[0], topk_group=groups[1]))
    count = sum(p.numel() for p in theirs.parameters()) + sum(b.numel() for n, b in theirs.named_buffers()
                                                              if "e_score_correction_bias" in n)
    assert main == count, (main, count)
    assert abs(main - published) / published < 0.015
    if cfg.model.mtp_num_layers:  # the files' 685B hold the module with its copies of the embedding and output layer
        assert abs(ours + 2 * vocab * 7168 - 685e9) / 685e9 < 0.002


def test_all_to_all_bytes_by_hand():
    """4 L_moe B s k h (EP - 1) / EP elements per step: 3 MoE layers, 16 x 64 tokens, top-2, width 32, EP 4, bf16."""
    cfg = load_config([*NULL, "--num-experts", "8", "--moe-router-topk", "2", "--num-layers", "4", "--moe-layer-freq",
                       "[0,1,1,1]", "--hidden-size", "32", "--seq-length", "64", "--global-batch-size", "16",
                       "--micro-batch-size", "2",
                       "--expert-model-parallel-size", "4", "--swiglu", "--disable-bias-linear"], world_size=8)
    assert all_to_all_bytes(cfg, 8, mixed=True) == 4 * 3 * 16 * 64 * 2 * 32 * 3 / 4 * 2
