"""Attention options of the model section that today's Hugging Face families need (Megatron's flag names where
Megatron has them), and the rules among them. The RoPE math they configure is the model's
(``megalm/model/rope.py``); rules that involve the parallel layout are in ``layout.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megalm.config.fields import ConfigError, opt, parse_layer_pattern


@dataclass
class AttentionOptions:
    add_qkv_bias: bool = opt(False, "biases on the query, key and value projections only, also with "
                             "--disable-bias-linear (Qwen2/2.5)")
    use_rope_scaling: bool = opt(False, "Llama 3.1's RoPE frequency scaling (transformers' rope_type llama3): "
                                 "long wavelengths divided by --rope-scaling-factor, a smooth blend between")
    rope_scaling_factor: float = opt(8.0, "with --use-rope-scaling: how much the long wavelengths are stretched")
    rope_scaling_low_freq_factor: float = opt(1.0, "with --use-rope-scaling: wavelengths above original length / "
                                              "this are scaled fully")
    rope_scaling_high_freq_factor: float = opt(4.0, "with --use-rope-scaling: wavelengths below original length / "
                                               "this are left alone")
    rope_scaling_original_max_position_embeddings: int = opt(8192, "with --use-rope-scaling: the context length "
                                                             "the model was trained at before scaling")
    sliding_window: Optional[int] = opt(None, "each query sees only the last this-many positions, itself included "
                                        "(Mistral; transformers' sliding_window)")
    softmax_type: str = opt("vanilla", "attention softmax: plain (vanilla), with a zero logit every query may put "
                            "weight on (off-by-one), or with a learned one per head, the attention sink of GPT-OSS "
                            "(learnable); both need --attention-backend unfused", choices=("vanilla", "off-by-one",
                                                                                            "learnable"))
    window_attn_skip_freq: Optional[str] = opt(None, "with --sliding-window: which layers attend fully instead: an "
                                               "integer N (every N-th layer, the others windowed: GPT-OSS's 2), "
                                               "or one 1 (window) / 0 (full) per layer, e.g. '[1,1,1,0]*3' "
                                               "(Megatron's names and meaning)")
    rotary_percent: float = opt(1.0, "share of each head's width that RoPE rotates, its first dims (GLM-4.5: 0.5; "
                                "transformers' partial_rotary_factor)")
    rope_type: str = opt("rope", "RoPE frequencies: plain (rope, with --use-rope-scaling Llama 3.1's), or YaRN's "
                         "context extension (yarn: DeepSeek-V3, GPT-OSS, Qwen's long-context models)",
                         choices=("rope", "yarn"))
    rotary_scaling_factor: float = opt(1.0, "with --rope-type yarn: how many times the original context is "
                                       "stretched (transformers' factor)")
    original_max_position_embeddings: int = opt(4096, "with --rope-type yarn: the context length the model was "
                                                "trained at before the extension")
    beta_fast: float = opt(32.0, "with --rope-type yarn: rotations over the original context above which a "
                           "frequency is left alone")
    beta_slow: float = opt(1.0, "with --rope-type yarn: rotations below which a frequency is fully interpolated")
    mscale: float = opt(1.0, "with --rope-type yarn: the attention-scale correction 0.1 mscale ln(factor) + 1 "
                        "(divided by the same with --mscale-all-dim when both are set) multiplies RoPE's cos and "
                        "sin")
    mscale_all_dim: float = opt(0.0, "with --rope-type yarn: see --mscale")
    yarn_correction_range_round_to_int: bool = opt(True, "with --rope-type yarn: do not round the band of "
                                                   "interpolated dims to whole dims (GPT-OSS; transformers' "
                                                   "truncate false)", flag="--disable-yarn-correction-rounding",
                                                   negate=True)
    multi_latent_attention: bool = opt(False, "multi-latent attention (DeepSeek-V2/V3, Kimi K2): queries and "
                                       "keys/values come up from low-rank latents, plus a RoPE part of the key "
                                       "that every head shares; generation caches the latent, not the heads")
    q_lora_rank: Optional[int] = opt(None, "with --multi-latent-attention: rank of the query's latent (default: "
                                     "a plain query projection)")
    kv_lora_rank: int = opt(32, "with --multi-latent-attention: rank of the key/value latent")
    qk_head_dim: int = opt(128, "with --multi-latent-attention: each head's query/key width that RoPE leaves "
                           "alone")
    qk_pos_emb_head_dim: int = opt(64, "with --multi-latent-attention: each head's query/key width that RoPE "
                                   "rotates (the key's part shared by every head)")
    v_head_dim: int = opt(128, "with --multi-latent-attention: each head's value width")

    def window_layers(self) -> List[bool]:
        """For each layer, whether its attention is windowed (``--sliding-window`` on it)."""
        if self.sliding_window is None:
            return [False] * self.num_layers
        if self.window_attn_skip_freq is None:
            return [True] * self.num_layers
        return parse_window_pattern(self.window_attn_skip_freq, self.num_layers)

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dims RoPE rotates."""
        if self.multi_latent_attention:
            return self.qk_pos_emb_head_dim
        return int(self.head_dim * self.rotary_percent)

    @property
    def query_head_dim(self) -> int:
        """Each head's query (and key) width."""
        return self.qk_head_dim + self.qk_pos_emb_head_dim if self.multi_latent_attention else self.head_dim

    @property
    def value_head_dim(self) -> int:
        """Each head's value (and output) width."""
        return self.v_head_dim if self.multi_latent_attention else self.head_dim


def parse_window_pattern(text: str, num_layers: int) -> List[bool]:
    """Megatron's ``--window-attn-skip-freq``: N windows every layer but each N-th; a 0/1 list says which."""
    return parse_layer_pattern(text, num_layers, "--window-attn-skip-freq", lambda i, n: (i + 1) % n != 0,
                               f", e.g. '[1,0]*{max(num_layers // 2, 1)}'")


def validate_attention(m) -> None:
    if m.multi_latent_attention:
        validate_mla(m)
    if m.use_rope_scaling:
        if m.position_embedding_type != "rope":
            raise ConfigError("--use-rope-scaling needs --position-embedding-type rope")
        if m.rope_scaling_factor <= 0 or m.rope_scaling_high_freq_factor <= m.rope_scaling_low_freq_factor or \
                m.rope_scaling_low_freq_factor <= 0 or m.rope_scaling_original_max_position_embeddings < 1:
            raise ConfigError("--use-rope-scaling: --rope-scaling-factor and --rope-scaling-low-freq-factor must be "
                              "positive, --rope-scaling-high-freq-factor above the low one, "
                              "--rope-scaling-original-max-position-embeddings at least 1")
    if m.rope_type == "yarn":
        if m.position_embedding_type != "rope" or m.use_rope_scaling:
            raise ConfigError("--rope-type yarn needs --position-embedding-type rope, without --use-rope-scaling")
        if not m.rotary_scaling_factor >= 1 or m.original_max_position_embeddings < 1 or \
                not m.beta_fast >= m.beta_slow > 0 or m.mscale < 0 or m.mscale_all_dim < 0:
            raise ConfigError("--rope-type yarn: --rotary-scaling-factor must be at least 1, "
                              "--original-max-position-embeddings at least 1, --beta-fast at least --beta-slow, "
                              "above 0 (Kimi K2: 1 and 1), --mscale and --mscale-all-dim at least 0")
    if m.rotary_percent != 1.0:
        if m.position_embedding_type != "rope":
            raise ConfigError("--rotary-percent needs --position-embedding-type rope")
        if not 0 < m.rotary_percent <= 1 or m.rotary_dim < 2 or m.rotary_dim % 2:
            raise ConfigError(f"--rotary-percent {m.rotary_percent} of head size {m.head_dim} rotates "
                              f"{m.rotary_dim} dims: give a share in (0, 1] that leaves an even number, at least 2")
    if m.softmax_type != "vanilla" and m.attention_backend != "unfused":
        raise ConfigError(f"--softmax-type {m.softmax_type} puts a sink in the softmax's denominator, which "
                          f"--attention-backend {m.attention_backend} cannot apply: use --attention-backend unfused")
    if m.sliding_window is not None and m.sliding_window < 1:
        raise ConfigError(f"--sliding-window must be at least 1, got {m.sliding_window}")
    if m.window_attn_skip_freq is not None:
        if m.sliding_window is None:
            raise ConfigError("--window-attn-skip-freq needs --sliding-window")
        m.window_layers()  # parses the pattern


def validate_mla(m) -> None:
    for value, flag in ((m.kv_lora_rank, "--kv-lora-rank"), (m.qk_head_dim, "--qk-head-dim"),
                        (m.qk_pos_emb_head_dim, "--qk-pos-emb-head-dim"), (m.v_head_dim, "--v-head-dim")):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if m.q_lora_rank is not None and m.q_lora_rank < 1:
        raise ConfigError(f"--q-lora-rank must be at least 1, got {m.q_lora_rank}")
    if m.position_embedding_type != "rope" or m.rotary_percent != 1.0:
        raise ConfigError("--multi-latent-attention rotates --qk-pos-emb-head-dim dims of each head: it needs "
                          "--position-embedding-type rope, without --rotary-percent")
    if m.qk_pos_emb_head_dim % 2:
        raise ConfigError(f"--qk-pos-emb-head-dim {m.qk_pos_emb_head_dim} must be even (RoPE turns pairs of dims)")
    if m.num_query_groups != m.num_attention_heads:
        raise ConfigError(f"--multi-latent-attention gives every query head its own key and value: drop "
                          f"--num-query-groups {m.num_query_groups}")
    if m.qk_layernorm:
        raise ConfigError("--multi-latent-attention normalises its latents, not each head: drop --qk-layernorm")
    if m.add_bias_linear or m.add_qkv_bias:
        raise ConfigError("--multi-latent-attention has no biases (DeepSeek's has none; the latent cache folds the "
                          "up-projections into the queries): add --disable-bias-linear, drop --add-qkv-bias")
