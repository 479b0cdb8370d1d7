"""The model section: the decoder's shape, its attention (``attention.py``) and mixture-of-experts (``moe.py``)
options, their derived defaults and the rules among them. Rules that involve the parallel layout are in
``layout.py``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megalm.config.attention import AttentionOptions, validate_attention
from megalm.config.fields import ConfigError, opt, positive
from megalm.config.moe import MoEOptions, validate_moe


@dataclass
class ModelConfig(MoEOptions, AttentionOptions):
    num_layers: int = opt(2, "transformer layers")
    hidden_size: int = opt(64, "model width")
    ffn_hidden_size: Optional[int] = opt(None, "MLP width (default 4*hidden, or Megatron's 2/3 of that with --swiglu)")
    num_attention_heads: int = opt(4, "attention heads")
    num_query_groups: Optional[int] = opt(None, "key/value heads for grouped-query attention (default: one per head)")
    seq_length: int = opt(128, "tokens per training sample")
    max_position_embeddings: Optional[int] = opt(None, "learned position table size (default --seq-length)")
    position_embedding_type: str = opt("learned_absolute", "position encoding", choices=("learned_absolute", "rope"))
    rotary_base: float = opt(10000.0, "RoPE base frequency")
    normalization: str = opt("LayerNorm", "normalization layer", choices=("LayerNorm", "RMSNorm"))
    norm_epsilon: float = opt(1e-5, "epsilon of the normalization layers")
    swiglu: bool = opt(False, "SwiGLU MLP instead of GELU")
    quick_geglu: bool = opt(False, "with --swiglu: the gate's activation is x sigmoid(1.702 x) instead of SiLU "
                            "(GPT-OSS)")
    glu_linear_offset: float = opt(0.0, "with --swiglu: added to the linear half before the product (GPT-OSS: 1)")
    activation_func_clamp_value: Optional[float] = opt(None, "with --swiglu: the gate clamped from above and the "
                                                       "linear half to +-this before the product (GPT-OSS: 7)")
    qk_layernorm: bool = opt(False, "normalise each head's queries and keys (--normalization's kind) before RoPE "
                             "(Qwen3, OLMo 2)")
    kv_channels: Optional[int] = opt(None, "width of each attention head (default --hidden-size / "
                                     "--num-attention-heads)")
    gelu_approximation: str = opt("none", "GELU of the MLP: exact (none) or the tanh approximation of GPT-2 "
                                  "(transformers' gelu_new, Megatron's --openai-gelu)", choices=("none", "tanh"))
    untie_embeddings_and_output_weights: bool = opt(False, "separate output layer instead of the embedding matrix")
    add_bias_linear: bool = opt(True, "no biases in linear layers", flag="--disable-bias-linear", negate=True)
    hidden_dropout: float = opt(0.0, "dropout after attention and MLP")
    attention_dropout: float = opt(0.0, "dropout on attention probabilities")
    init_method_std: float = opt(0.02, "std of the normal weight initialisation")
    make_vocab_size_divisible_by: int = opt(128, "pad the vocabulary to a multiple of this (times TP)")
    recompute_granularity: Optional[str] = opt(None, "recompute activations in backward: whole layers (full) or "
                                               "only the attention core (selective)", choices=("full", "selective"))
    recompute_method: str = opt("uniform", "with full: checkpoint groups of --recompute-num-layers layers (uniform) "
                                "or only the first --recompute-num-layers layers (block)", choices=("uniform", "block"))
    recompute_num_layers: int = opt(1, "layers per recomputed group (uniform) or recomputed layers (block)")
    mtp_num_layers: Optional[int] = opt(None, "multi-token prediction (DeepSeek-V3): this many modules after the "
                                        "main stack, the k-th predicting the token k further ahead (default: none)")
    mtp_loss_scaling_factor: float = opt(0.1, "with --mtp-num-layers: the training loss adds this / D times the sum "
                                         "of the modules' losses")
    attention_backend: str = opt("sdpa", "attention implementation: torch scaled_dot_product_attention (flash on "
                                 "GPU), matmuls around megalm's fused scale-mask-softmax kernel, or the plain "
                                 "matmul-softmax-matmul reference", choices=("sdpa", "fused", "unfused"))

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


def fill_model_defaults(m: ModelConfig) -> None:
    if m.ffn_hidden_size is None:
        m.ffn_hidden_size = int(4 * m.hidden_size * 2 / 3 / 64) * 64 if m.swiglu else 4 * m.hidden_size
        m.ffn_hidden_size = max(m.ffn_hidden_size, 1)
    if m.num_query_groups is None:
        m.num_query_groups = m.num_attention_heads
    if m.max_position_embeddings is None:
        m.max_position_embeddings = m.seq_length


def validate_model(m: ModelConfig) -> None:
    for value, flag in [(m.num_layers, "--num-layers"), (m.hidden_size, "--hidden-size"),
                        (m.num_attention_heads, "--num-attention-heads"), (m.num_query_groups, "--num-query-groups"),
                        (m.seq_length, "--seq-length"), (m.ffn_hidden_size, "--ffn-hidden-size"),
                        (m.max_position_embeddings, "--max-position-embeddings"),
                        (m.make_vocab_size_divisible_by, "--make-vocab-size-divisible-by")]:
        positive(value, flag)
    if m.kv_channels is not None:
        positive(m.kv_channels, "--kv-channels")
    elif m.hidden_size % m.num_attention_heads and not m.multi_latent_attention:
        raise ConfigError(f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
                          f"{m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by --num-query-groups "
                          f"{m.num_query_groups}")
    if m.position_embedding_type == "rope" and m.head_dim % 2 and not m.multi_latent_attention:
        raise ConfigError(f"--position-embedding-type rope needs an even head size; hidden {m.hidden_size} / "
                          f"heads {m.num_attention_heads} = {m.head_dim}")
    if m.position_embedding_type == "learned_absolute" and m.max_position_embeddings < m.seq_length:
        raise ConfigError(f"--max-position-embeddings {m.max_position_embeddings} is smaller than --seq-length "
                          f"{m.seq_length}")
    for value, flag in [(m.hidden_dropout, "--hidden-dropout"), (m.attention_dropout, "--attention-dropout")]:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{flag} must be in [0, 1), got {value}")
    if m.init_method_std <= 0:
        raise ConfigError(f"--init-method-std must be positive, got {m.init_method_std}")
    if (m.quick_geglu or m.glu_linear_offset or m.activation_func_clamp_value is not None) and not m.swiglu:
        raise ConfigError("--quick-geglu, --glu-linear-offset and --activation-func-clamp-value shape a gated MLP: "
                          "they need --swiglu")
    if m.activation_func_clamp_value is not None and not m.activation_func_clamp_value > 0:
        raise ConfigError(f"--activation-func-clamp-value must be positive, got {m.activation_func_clamp_value}")
    if m.recompute_granularity == "full" and not 1 <= m.recompute_num_layers <= m.num_layers:
        raise ConfigError(f"--recompute-num-layers {m.recompute_num_layers} must be between 1 and --num-layers "
                          f"{m.num_layers}")
    if m.mtp_num_layers is not None:
        positive(m.mtp_num_layers, "--mtp-num-layers")
        if m.mtp_num_layers >= m.seq_length:
            raise ConfigError(f"--mtp-num-layers {m.mtp_num_layers} leaves no position with a target in "
                              f"--seq-length {m.seq_length} sequences: give fewer than --seq-length")
        if m.position_embedding_type != "rope":
            raise ConfigError("--mtp-num-layers needs --position-embedding-type rope (its modules reuse the main "
                              "stack's positions, as DeepSeek-V3's do)")
        if m.mtp_loss_scaling_factor < 0:
            raise ConfigError(f"--mtp-loss-scaling-factor must be at least 0, got {m.mtp_loss_scaling_factor}")
    validate_attention(m)
    validate_moe(m)
