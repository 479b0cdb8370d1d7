"""Model shapes and loss for both flavours, deterministic init, padding masked, KV cache == no cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from megalm.config import Config, finalize
from megalm.generate import generate, sample_next
from megalm.model.gpt import GPT

GPT2 = {}
LLAMA = dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, num_query_groups=2,
             untie_embeddings_and_output_weights=True, add_bias_linear=False)


def model_config(**overrides):
    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 299
    cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads, cfg.model.seq_length = 2, 32, 4, 16
    for k, v in overrides.items():
        setattr(cfg.model, k, v)
    return finalize(cfg).model


def build(flavour, seed=0, **kw):
    m = GPT(model_config(**flavour, **kw), 300)
    m.init_weights(seed)
    return m


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_forward_backward(flavour):
    m = build(flavour)
    x = torch.randint(0, 300, (3, 16))
    loss = m(x, x.roll(-1, 1))
    assert loss.shape == (3, 16)
    assert abs(loss.mean().item() - math.log(300)) < 0.5  # near-uniform at init
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    logits = m(x)
    assert logits.shape == (3, 16, 300)  # real vocabulary only, padding removed
    assert torch.allclose(F.cross_entropy(logits.reshape(-1, 300), x.roll(-1, 1).reshape(-1), reduction="none"),
                          loss.detach().reshape(-1), atol=1e-5)


def test_flavours_have_their_parts():
    g, l = build(GPT2), build(LLAMA)
    names_g, names_l = dict(g.named_parameters()), dict(l.named_parameters())
    assert "position_embedding.weight" in names_g and "output.weight" not in names_g
    assert "layers.0.mlp.w3.weight" in names_l and "output.weight" in names_l
    assert not any(n.endswith("bias") for n in names_l)
    assert names_l["layers.0.attention.wk.weight"].shape == (2 * 8, 32)  # 2 query groups of head size 8
    assert g.padded_vocab_size == 384 and g.num_parameters() < sum(p.numel() for p in g.parameters())


def test_init_is_deterministic_and_padding_is_zero():
    a, b, c = build(GPT2, seed=5), build(GPT2, seed=5), build(GPT2, seed=6)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), n
    assert not torch.equal(a.embedding.weight, c.embedding.weight)
    assert a.embedding.weight[300:].abs().sum() == 0
    std = a.layers["0"].attention.wo.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(4), rel=0.2)  # scaled init of residual projections


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_kv_cache_matches_recompute(flavour):
    m = build(flavour).eval()
    prompt = [5, 17, 42, 7]
    with_cache = generate(m, prompt, 10, use_cache=True)
    without = generate(m, prompt, 10, use_cache=False)
    assert with_cache == without and len(with_cache) == 14


@pytest.mark.parametrize("backend", ["unfused", "fused"])
def test_attention_backends_match_sdpa(backend):
    m = build(LLAMA).eval()
    x = torch.randint(0, 300, (2, 16))
    ref = m(x)
    m.cfg.attention_backend = backend
    assert torch.allclose(m(x), ref, atol=1e-5)


def test_sampling():
    logits = torch.tensor([[0.0, 5.0, 1.0, -1.0]])
    assert sample_next(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {1}


def test_generation_respects_position_limit():
    m = build(GPT2).eval()  # 16 learned positions
    out = generate(m, list(range(10)), 50)
    assert len(out) == 16
    with pytest.raises(ValueError, match="longer than the model's 16 positions"):
        generate(m, list(range(20)), 5)
