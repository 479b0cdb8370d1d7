"""What the parity tests share: the tiny model of both flavours, a fixed batch, the tolerance check."""
import torch
import torch.distributed as dist

from megalm.config import Config, finalize

VOCAB = 300
FLAVOURS = {
    "gpt2": {},
    "llama": dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=4,
                  untie_embeddings_and_output_weights=True, add_bias_linear=False),
    # multi-latent attention: replicated down-projections on the block's input, column-parallel up-projections
    "mla": dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                untie_embeddings_and_output_weights=True, multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=8,
                qk_head_dim=4, qk_pos_emb_head_dim=4, v_head_dim=6),
}


def parity_model_config(**overrides):
    """8 heads so that TP 1, 2 and 4 all split them (and 4 key/value groups for the Llama flavour)."""
    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", VOCAB - 1
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 8, 16
    for k, v in overrides.items():
        setattr(m, k, v)
    return finalize(cfg).model


def fixed_batch():
    g = torch.Generator().manual_seed(123)
    x = torch.randint(0, VOCAB, (2, 17), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def assert_close(actual, expected, rtol, what, floor=1e-6):
    """Relative error in norm. ``floor`` keeps analytically-zero tensors (the key bias gradient: softmax ignores
    a constant added to every score, so it is fp32 rounding of 0, ~1e-11) from comparing noise with noise."""
    err = ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()
    assert err < rtol, f"{what}: relative error {err:.2e} >= {rtol:.0e}"


def unpad(full, param, vocab_size):
    """Drop the padding rows of a vocabulary-sized tensor."""
    return full[:vocab_size] if getattr(param, "padded_rows", False) else full


def gather_full(t, tp_dim, topo):
    """The whole tensor from every TP rank's shard along ``tp_dim``."""
    if tp_dim is None or topo.tp == 1:
        return t.detach().cpu().clone()
    parts = [torch.empty_like(t) for _ in range(topo.tp)]
    dist.all_gather(parts, t.detach().contiguous(), group=topo.tp_group)
    return torch.cat(parts, dim=tp_dim).cpu()
