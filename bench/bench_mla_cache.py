"""Multi-latent attention's KV cache against the expanded one, in one run (CPU, fp32):

(a) bytes per token and layer: what megalm's cache holds for an MLA layer (the normalised latent and the rotated
    key part every head shares, measured on the cache's tensors after a generation) against what caching the
    expanded heads would hold (the keys and values the layer's up-projection makes from those latents, measured
    on them); the target is (kv_lora_rank + qk_pos_emb_head_dim) x dtype bytes, whatever the heads;
(b) greedy generation from the latent cache (queries folded into latent space) against the expanded path (every
    step recomputed through expanded heads): the same tokens, and the time per new token of each;
(c) the same arithmetic at DeepSeek-V3's real shape (128 heads, 512 + 64 latent, 192 + 128 head widths, 61
    layers, bf16).

python bench/bench_mla_cache.py [--heads 16] [--layers 2] [--hidden 512] [--prompt 64] [--new 32]
"""
import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.config import Config, finalize  # noqa: E402
from megalm.generate import generate  # noqa: E402
from megalm.model.gpt import GPT  # noqa: E402
from megalm.model.transformer import KVCache  # noqa: E402


def mla_model(a) -> GPT:
    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 999
    m = cfg.model
    for k, v in dict(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                     seq_length=a.prompt + a.new, position_embedding_type="rope", normalization="RMSNorm",
                     swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
                     multi_latent_attention=True, q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
                     qk_head_dim=a.qk_head_dim, qk_pos_emb_head_dim=a.pos, v_head_dim=a.v_head_dim,
                     rope_type="yarn", rotary_scaling_factor=4.0, original_max_position_embeddings=a.prompt,
                     mscale=1.0, mscale_all_dim=1.0).items():
        setattr(m, k, v)
    model = GPT(finalize(cfg).model, 1000).eval()
    model.init_weights(0)
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--q-lora-rank", type=int, default=384)
    p.add_argument("--kv-lora-rank", type=int, default=512)
    p.add_argument("--qk-head-dim", type=int, default=128)
    p.add_argument("--pos", type=int, default=64)
    p.add_argument("--v-head-dim", type=int, default=128)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=32)
    a = p.parse_args()
    torch.manual_seed(0)
    model = mla_model(a)
    m = model.cfg
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {a.layers} layers, hidden {a.hidden}, {a.heads} heads, latent {a.kv_lora_rank} + {a.pos}, head "
          f"widths {m.query_head_dim} / {a.v_head_dim}, fp32")
    prompt = torch.randint(0, 1000, (a.prompt,)).tolist()

    # (a) the cache after prefill + decoding, and the expanded keys and values of the same positions
    cache = KVCache(a.prompt + a.new)
    with torch.no_grad():
        model(torch.tensor([prompt]), kv_cache=cache)
        for _ in range(a.new - 1):
            model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
        tokens = cache.length
        latent, rotated = cache.keys["0"][:, :, :tokens], cache.values["0"][:, :, :tokens]
        ours = (latent.numel() + rotated.numel()) * latent.element_size() // tokens
        attention = model.layers["0"].attention
        up = attention.wkv_b(latent[:, 0]).view(1, tokens, a.heads, -1)
        k_nope, v = up.split([a.qk_head_dim, a.v_head_dim], -1)
        keys = torch.cat((k_nope, rotated[:, 0, :, None].expand(-1, -1, a.heads, -1)), -1)
        expanded = (keys.numel() + v.numel()) * keys.element_size() // tokens
    target = (a.kv_lora_rank + a.pos) * 4
    print(f"(a) cache bytes per token per layer: latent {ours} (target (kv_lora_rank + qk_pos_emb_head_dim) x 4 = "
          f"{target}: {'met' if ours == target else 'NOT MET'}), expanded heads {expanded}: {expanded / ours:.1f}x "
          f"smaller")
    assert ours == target

    # (b) greedy tokens and time per token: latent cache against the expanded path
    def timed(use_cache):
        start = time.perf_counter()
        out = generate(model, prompt, a.new, use_cache=use_cache)
        return out, (time.perf_counter() - start) / a.new

    latent_tokens, latent_s = timed(True)
    expanded_tokens, expanded_s = timed(False)
    same = latent_tokens == expanded_tokens
    print(f"(b) greedy, {a.new} new tokens after {a.prompt}: the same tokens: {same}; {1000 * latent_s:.1f} ms per "
          f"token from the latent cache, {1000 * expanded_s:.1f} ms through expanded heads recomputed "
          f"({expanded_s / latent_s:.2f}x)")
    assert same

    # (c) DeepSeek-V3's shape, bf16
    heads, layers = 128, 61
    latent_b, expanded_b = (512 + 64) * 2, heads * ((128 + 64) + 128) * 2
    print(f"(c) DeepSeek-V3 (128 heads, 61 layers, bf16): {latent_b} bytes per token per layer from the latent, "
          f"{expanded_b} expanded ({expanded_b / latent_b:.1f}x); per token over all layers "
          f"{latent_b * layers / 1024:.1f} KiB against {expanded_b * layers / 1024 ** 2:.2f} MiB; a 128K-token "
          f"context: {latent_b * layers * 131072 / 1024 ** 3:.1f} GiB against "
          f"{expanded_b * layers * 131072 / 1024 ** 3:.0f} GiB")


if __name__ == "__main__":
    main()
