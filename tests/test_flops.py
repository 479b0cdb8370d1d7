"""The FLOP formula on a configuration worked out by hand, and MFU arithmetic."""
import pytest

from test_model import model_config
from megalm.model.gpt import GPT
from megalm.training.flops import Throughput, flops_per_token, peak_tflops


def gpt2_config(**kw):
    return model_config(hidden_size=64, seq_length=128, **kw)


def test_formula_by_hand():
    cfg = gpt2_config()
    layers, output = GPT(cfg, 1000).matmul_parameters()
    h = 64
    # per layer: q, k, v, o (4h^2 + 4h), MLP 4h wide (8h^2 + 5h), two LayerNorms (4h)
    assert layers == 2 * (12 * h * h + 13 * h) and output == 1000 * h
    model, hardware = flops_per_token(cfg, layers, output)
    assert model == 6 * (99968 + 64000) + 12 * 2 * 64 * 128 == hardware
    full = gpt2_config(recompute_granularity="full")
    assert flops_per_token(full, layers, output)[1] == pytest.approx(model + (6 * 99968 + 12 * 2 * 64 * 128) / 3)
    sel = gpt2_config(recompute_granularity="selective")
    assert flops_per_token(sel, layers, output)[1] == pytest.approx(model + 12 * 2 * 64 * 128 / 3)


def test_mfu_arithmetic():
    cfg = gpt2_config()
    t = Throughput(cfg, 99968, 64000, world_size=2, peak=1.0)
    out = t(tokens=10_000, seconds=2.0)
    per_token = 6 * (99968 + 64000) + 12 * 2 * 64 * 128
    assert out["tokens_per_sec"] == 5000
    assert out["tflops_per_device"] == pytest.approx(per_token * 5000 / 2 / 1e12)
    assert out["mfu"] == pytest.approx(out["tflops_per_device"] / 1.0)
    assert "mfu" not in Throughput(cfg, 1, 1, 1, None)(1, 1.0)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("cpu") is None
    assert peak_tflops("cpu", 2.5) == 2.5


def test_mfu_counts_model_flops_while_tflops_count_recomputation():
    """Only with recomputation do the two differ: TFLOP/s per device counts the extra forward, MFU does not."""
    per_token = 6 * (99968 + 64000) + 12 * 2 * 64 * 128
    for granularity, extra in (("full", (6 * 99968 + 12 * 2 * 64 * 128) / 3), ("selective", 12 * 2 * 64 * 128 / 3)):
        out = Throughput(gpt2_config(recompute_granularity=granularity), 99968, 64000, world_size=2, peak=1.0)(
            tokens=10_000, seconds=2.0)
        assert out["tflops_per_device"] == pytest.approx((per_token + extra) * 5000 / 2 / 1e12)
        assert out["mfu"] == pytest.approx(per_token * 5000 / 2 / 1e12)
        assert out["mfu"] < out["tflops_per_device"]


def test_latent_attention_and_multi_token_prediction_count_their_matmuls():
    """Multi-latent attention's FLOPs are its down- and up-projections and heads of widths 12 (8 + 4 rotated)
    and 12; the MTP module adds its projection (2h -> h), one layer and one more output layer."""
    cfg = model_config(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                       position_embedding_type="rope", normalization="RMSNorm", swiglu=True, ffn_hidden_size=64,
                       add_bias_linear=False, untie_embeddings_and_output_weights=True, multi_latent_attention=True,
                       q_lora_rank=16, kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=12,
                       mtp_num_layers=1)
    layers, output = GPT(cfg, 100).matmul_parameters()
    h = 32
    attention = h * 16 + 16 + 16 * 4 * 12 + h * (8 + 4) + 8 + 8 * 4 * (8 + 12) + 4 * 12 * h
    layer = 2 * h + attention + 3 * h * 64
    assert layers == 3 * layer + 3 * h + 2 * h * h and output == 2 * 100 * h
    assert flops_per_token(cfg, layers, output)[0] == 6 * layers + 6 * 3 * 16 * 4 * (12 + 12) + 6 * output


def test_lora_counts_no_weight_gradient_for_the_frozen_base():
    """Under LoRA the frozen weights cost 4 FLOPs per parameter and token, the adapters 6: what torch's FLOP
    counter sees of a forward and backward, as the difference from full training, within 2%."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from megalm.config import PostTrainConfig
    from megalm.model.lora import apply_lora, freeze_base
    from megalm.parallel.state import Topology

    cfg = model_config(hidden_size=64, seq_length=64, position_embedding_type="rope", normalization="RMSNorm",
                       swiglu=True, ffn_hidden_size=128, add_bias_linear=False, untie_embeddings_and_output_weights=True)
    tokens = torch.randint(0, 500, (2, 64))

    def measured(lora: bool) -> int:
        model = GPT(cfg, 512)
        if lora:
            p = PostTrainConfig()
            p.lora_rank, p.lora_target_modules = 8, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
            apply_lora(model, p, Topology())
        model.init_weights(0)
        counts = model.matmul_parameters()
        adapters = freeze_base(model) if lora else None
        if lora:  # gradients below the first layer, as in full training: the formula counts every layer's input
            model.embedding.weight.requires_grad_(True)  # gradient (autograd skips the first layer's q, k, v ones)
        with FlopCounterMode(display=False) as counter:
            model(tokens, tokens).mean().backward()
        return counter.get_total_flops(), counts, adapters

    full, (layers, output), _ = measured(False)
    lora, (layers_lora, _), adapters = measured(True)
    formula = flops_per_token(cfg, layers, output)[0] - flops_per_token(cfg, layers_lora, output, adapters)[0]
    assert (full - lora) / tokens.numel() == pytest.approx(formula, rel=0.02)
