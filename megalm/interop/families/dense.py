"""The dense families: GPT-2, and the Llama-like ones (Llama 3.x, Mistral, Qwen2/2.5, Qwen3), which differ by a model
option each; ``LlamaLike`` is also what the mixture-of-experts families (``moe.py``) build on."""
from __future__ import annotations

from megalm.config import ModelConfig
from megalm.interop.families.base import ConversionError, Family, Rename, Stacked, require


class GPT2(Family):
    model_type, architecture = "gpt2", "GPT2LMHeadModel"
    adds_keys = frozenset({"n_layer", "n_embd", "n_head", "n_inner", "n_positions", "layer_norm_epsilon",
                           "activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                           "add_cross_attention"})
    GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}

    def claims(self, m):
        return (m.position_embedding_type, m.normalization, m.swiglu) == ("learned_absolute", "LayerNorm", False)

    def check(self, m):
        mha = m.num_query_groups == m.num_attention_heads
        if not m.add_bias_linear or m.untie_embeddings_and_output_weights or not mha:
            raise ConversionError("GPT-2 needs biases, tied embeddings and one key/value head per query head")

    def hf_config(self, m, vocab, eod, dtype):
        return {"architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab,
                "n_positions": m.max_position_embeddings, "n_embd": m.hidden_size, "n_layer": m.num_layers,
                "n_head": m.num_attention_heads, "n_inner": m.ffn_hidden_size,
                "activation_function": "gelu_new" if m.gelu_approximation == "tanh" else "gelu",
                "layer_norm_epsilon": m.norm_epsilon, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "initializer_range": m.init_method_std, "bos_token_id": eod, "eos_token_id": eod,
                "tie_word_embeddings": True, "torch_dtype": dtype}

    def model_config(self, hf):
        m = super().model_config(hf)
        require(hf, "activation_function", tuple(self.GELU), "gelu_new")
        require(hf, "scale_attn_weights", (True,), True)
        require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
        require(hf, "add_cross_attention", (False,), False)
        m.num_layers, m.hidden_size, m.num_attention_heads = hf["n_layer"], hf["n_embd"], hf["n_head"]
        m.ffn_hidden_size = hf.get("n_inner") or 4 * hf["n_embd"]
        m.max_position_embeddings = m.seq_length = hf["n_positions"]
        m.norm_epsilon = hf.get("layer_norm_epsilon", 1e-5)
        m.num_query_groups = m.num_attention_heads
        m.gelu_approximation = self.GELU[hf.get("activation_function", "gelu_new")]
        return m

    def renames(self, m):
        out = [Rename("embedding.weight", "transformer.wte.weight"),
               Rename("position_embedding.weight", "transformer.wpe.weight"),
               Rename("final_norm.weight", "transformer.ln_f.weight"),
               Rename("final_norm.bias", "transformer.ln_f.bias")]
        for i in range(m.num_layers):
            a, h = f"layers.{i}.", f"transformer.h.{i}."
            out += [Rename(a + "attention_norm.weight", h + "ln_1.weight"),
                    Rename(a + "attention_norm.bias", h + "ln_1.bias"),
                    Rename(a + "attention.wo.weight", h + "attn.c_proj.weight", True),
                    Rename(a + "attention.wo.bias", h + "attn.c_proj.bias"),
                    Rename(a + "mlp_norm.weight", h + "ln_2.weight"), Rename(a + "mlp_norm.bias", h + "ln_2.bias"),
                    Rename(a + "mlp.w1.weight", h + "mlp.c_fc.weight", True),
                    Rename(a + "mlp.w1.bias", h + "mlp.c_fc.bias"),
                    Rename(a + "mlp.w2.weight", h + "mlp.c_proj.weight", True),
                    Rename(a + "mlp.w2.bias", h + "mlp.c_proj.bias")]
            sizes = (m.hidden_size,) * 3
            for leaf, transpose in (("weight", True), ("bias", False)):
                out.append(Stacked(tuple(f"{a}attention.{w}.{leaf}" for w in ("wq", "wk", "wv")),
                                   f"{h}attn.c_attn.{leaf}", sizes, transpose))
        return out


LLAMA3_ROPE = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_scaling_low_freq_factor",
               "high_freq_factor": "rope_scaling_high_freq_factor",
               "original_max_position_embeddings": "rope_scaling_original_max_position_embeddings"}


# transformers' name -> megalm's, and whether transformers may leave it out (then megalm's default is its default)
YARN_ROPE = {"factor": ("rotary_scaling_factor", False),
             "original_max_position_embeddings": ("original_max_position_embeddings", False),
             "beta_fast": ("beta_fast", True), "beta_slow": ("beta_slow", True), "mscale": ("mscale", True),
             "mscale_all_dim": ("mscale_all_dim", True), "truncate": ("yarn_correction_range_round_to_int", True)}
SCALINGS = {"llama3": {k: (v, False) for k, v in LLAMA3_ROPE.items()}, "yarn": YARN_ROPE}


def _rope(hf: dict, m: ModelConfig, extra_keys=frozenset()) -> None:
    """RoPE from either spelling: ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters``
    (transformers 5): the base frequency, Llama 3.1's scaling (``rope_type`` llama3) and YaRN (``yarn``); any
    other scaling, or a setting of it megalm does not know (beyond the family's ``extra_keys``), is refused by
    name."""
    m.rotary_base = float(hf.get("rope_theta", 10000.0))
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if not params:
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", *SCALINGS):
            raise ConversionError(f"config.json: {key}.rope_type={kind!r} (RoPE scaling) is not implemented by "
                                  f"megalm; unscaled RoPE and rope_type 'llama3' and 'yarn' are")
        known = {"rope_type", "type", "rope_theta"} | set(SCALINGS.get(kind, ())) | extra_keys
        other = sorted(k for k in set(params) - known if not (k == "attention_factor" and params[k] is None))
        if other:
            raise ConversionError(f"config.json: {key} holds {', '.join(other)}, not implemented by megalm "
                                  f"for rope_type {kind!r}")
        m.rotary_base = float(params.get("rope_theta", m.rotary_base))
        if kind == "default":
            continue
        m.use_rope_scaling, m.rope_type = kind == "llama3", "yarn" if kind == "yarn" else "rope"
        for theirs, (ours, optional) in SCALINGS[kind].items():
            if params.get(theirs) is None:
                if optional:
                    continue
                raise ConversionError(f"config.json: {key} with rope_type {kind!r} lacks {theirs}")
            setattr(m, ours, type(getattr(m, ours))(params[theirs]))


def rope_scaling(m: ModelConfig):
    """transformers' RoPE scaling dict of a megalm model, or None."""
    if m.use_rope_scaling:
        return {"rope_type": "llama3", **{theirs: getattr(m, ours) for theirs, ours in LLAMA3_ROPE.items()}}
    if m.rope_type == "yarn":
        return {"rope_type": "yarn", **{theirs: getattr(m, ours) for theirs, (ours, _) in YARN_ROPE.items()}}
    return None


class LlamaLike(Family):
    """RoPE, RMSNorm, SwiGLU: Llama and every family below, which differ by a model option each
    (``--add-qkv-bias``, ``--qk-layernorm``, ``--sliding-window``, experts)."""
    adds_keys = frozenset({"num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                           "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                           "hidden_act", "head_dim"})
    moe = False  # a mixture-of-experts family
    qwen_window = False  # the window is Qwen's: use_sliding_window, and which layers have it
    has_window_key = True  # config.json carries sliding_window
    rope_keys = frozenset()  # settings in rope_parameters beyond the RoPE type, base and Llama 3.1's scaling

    softmax_type = "vanilla"  # GPT-OSS's attention has a sink in its softmax

    mla = False  # DeepSeek-V3's multi-latent attention

    def claims(self, m):
        return (m.position_embedding_type, m.normalization, m.swiglu) == ("rope", "RMSNorm", True) and \
            bool(m.num_experts) == self.moe and m.softmax_type == self.softmax_type and \
            m.multi_latent_attention == self.mla

    def check(self, m):
        if m.add_qkv_bias and (m.qk_layernorm or m.num_experts or m.add_bias_linear):
            raise ConversionError("--add-qkv-bias (Qwen2) goes with --disable-bias-linear, without --qk-layernorm "
                                  "or experts")
        if not self.qwen_window and not all(m.window_layers()) and any(m.window_layers()):
            raise ConversionError(f"{self.architecture or 'this family'} has one window on every layer or none: "
                                  f"drop --window-attn-skip-freq (Qwen2/Qwen3 have a window per layer)")

    def hf_config(self, m, vocab, eod, dtype):
        out = {"architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab,
               "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
               "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
               "num_key_value_heads": m.num_query_groups, "head_dim": m.head_dim,
               "max_position_embeddings": m.max_position_embeddings, "rms_norm_eps": m.norm_epsilon,
               "hidden_act": "silu", "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
               "initializer_range": m.init_method_std, "bos_token_id": eod, "eos_token_id": eod,
               "torch_dtype": dtype, "rope_theta": m.rotary_base}
        if self.has_window_key:
            out["sliding_window"] = m.sliding_window
        if rope_scaling(m):
            out["rope_scaling"] = rope_scaling(m)
        if self.qwen_window:  # the layers with a window, by name
            out.update(use_sliding_window=m.sliding_window is not None, max_window_layers=0,
                       layer_types=["sliding_attention" if on else "full_attention" for on in m.window_layers()])
        return out

    def model_config(self, hf):
        m = super().model_config(hf)
        require(hf, "hidden_act", ("silu",), "silu")
        m.position_embedding_type, m.normalization, m.swiglu = "rope", "RMSNorm", True
        m.num_layers, m.hidden_size = hf["num_hidden_layers"], hf["hidden_size"]
        m.num_attention_heads = hf["num_attention_heads"]
        m.num_query_groups = hf.get("num_key_value_heads") or m.num_attention_heads
        m.ffn_hidden_size = hf["intermediate_size"]
        m.max_position_embeddings = m.seq_length = hf.get("max_position_embeddings", 2048)
        m.norm_epsilon = hf.get("rms_norm_eps", 1e-6)
        _rope(hf, m, self.rope_keys)
        m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
        m.add_bias_linear = bool(hf.get("attention_bias", False))
        require(hf, "mlp_bias", (m.add_bias_linear,), m.add_bias_linear)
        if hf.get("head_dim") not in (None, m.head_dim):
            m.kv_channels = hf["head_dim"]  # a head width of its own (Qwen3)
        m.sliding_window, m.window_attn_skip_freq = self.window(hf, m.num_layers)
        return m

    def window(self, hf: dict, layers: int) -> tuple:
        """(the sliding window, which layers have it as ``--window-attn-skip-freq`` or None for all of them), or
        (None, None): ``sliding_window`` (for Qwen only with ``use_sliding_window``, and on the layers
        ``layer_types`` or ``max_window_layers`` name)."""
        window = hf.get("sliding_window")
        if window is None or (self.qwen_window and not hf.get("use_sliding_window", False)):
            return None, None  # Qwen2 configs carry a sliding_window they do not use
        types = hf.get("layer_types")
        if types is None and self.qwen_window:
            types = ["sliding_attention" if i >= hf.get("max_window_layers", layers) else "full_attention"
                     for i in range(layers)]
        if types is None:
            return int(window), None
        if set(types) - {"sliding_attention", "full_attention"} or len(types) != layers:
            raise ConversionError(f"config.json: layer_types={types!r}: megalm implements one entry per layer, "
                                  f"each 'sliding_attention' or 'full_attention'")
        if "sliding_attention" not in types:
            return None, None
        if "full_attention" not in types:
            return int(window), None
        return int(window), "[" + ",".join("1" if t == "sliding_attention" else "0" for t in types) + "]"

    def renames(self, m):
        moe = m.moe_layers()
        out = [Rename("embedding.weight", "model.embed_tokens.weight"),
               Rename("final_norm.weight", "model.norm.weight")]
        if m.untie_embeddings_and_output_weights:
            out.append(Rename("output.weight", "lm_head.weight"))
        for i in range(m.num_layers):
            out += self.layer_renames(m, f"layers.{i}.", f"model.layers.{i}.", moe[i])
        return out

    def layer_renames(self, m, a: str, h: str, moe: bool) -> list:
        """One decoder layer's tensors, ours under ``a``, theirs under ``h``."""
        biases = ("weight", "bias") if m.add_bias_linear else ("weight",)
        out = [Rename(a + "attention_norm.weight", h + "input_layernorm.weight"),
               Rename(a + "mlp_norm.weight", h + "post_attention_layernorm.weight")]
        mlp = () if moe else (("mlp.w1", "mlp.gate_proj"), ("mlp.w3", "mlp.up_proj"), ("mlp.w2", "mlp.down_proj"))
        out += self.attention_renames(m, a, h)
        for ours, theirs in (("attention.wo", "self_attn.o_proj"), *mlp):
            out += [Rename(f"{a}{ours}.{leaf}", f"{h}{theirs}.{leaf}") for leaf in biases]
        return out + (self.moe_renames(m, a, h) if moe else [])

    def attention_renames(self, m, a: str, h: str) -> list:
        """The attention's tensors but its output projection."""
        qkv_biases = ("weight", "bias") if m.add_bias_linear or m.add_qkv_bias else ("weight",)
        out = []
        for ours, theirs in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                             ("attention.wv", "self_attn.v_proj")):
            out += [Rename(f"{a}{ours}.{leaf}", f"{h}{theirs}.{leaf}") for leaf in qkv_biases]
        if m.qk_layernorm:
            out += [Rename(a + "attention.q_norm.weight", h + "self_attn.q_norm.weight"),
                    Rename(a + "attention.k_norm.weight", h + "self_attn.k_norm.weight")]
        return out

    def moe_renames(self, m, ours: str, theirs: str) -> list:
        return []


class Llama(LlamaLike):
    model_type, architecture = "llama", "LlamaForCausalLM"
    adds_keys = frozenset({"attention_bias", "mlp_bias"})
    has_window_key = False

    def claims(self, m):
        return super().claims(m) and not m.qk_layernorm and not m.add_qkv_bias and m.sliding_window is None

    def hf_config(self, m, vocab, eod, dtype):
        return dict(super().hf_config(m, vocab, eod, dtype), attention_bias=m.add_bias_linear,
                    mlp_bias=m.add_bias_linear)


class Mistral(LlamaLike):
    model_type, architecture = "mistral", "MistralForCausalLM"
    adds_keys = frozenset({"sliding_window"})

    def claims(self, m):
        return super().claims(m) and not m.qk_layernorm and not m.add_qkv_bias and m.sliding_window is not None

    def check(self, m):
        super().check(m)
        if m.add_bias_linear:
            raise ConversionError("Mistral (--sliding-window) has no biases: add --disable-bias-linear")


class Qwen2(LlamaLike):
    model_type, architecture = "qwen2", "Qwen2ForCausalLM"
    adds_keys = frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"})
    qwen_window = True

    def claims(self, m):
        return super().claims(m) and m.add_qkv_bias and not m.qk_layernorm

    def model_config(self, hf):
        m = super().model_config(hf)
        m.add_qkv_bias = True  # Qwen2's q, k and v projections always have biases, nothing else
        return m


class Qwen3(Qwen2):
    model_type, architecture = "qwen3", "Qwen3ForCausalLM"
    adds_keys = frozenset({"attention_bias"})

    def claims(self, m):
        return LlamaLike.claims(self, m) and m.qk_layernorm

    def hf_config(self, m, vocab, eod, dtype):
        return dict(super().hf_config(m, vocab, eod, dtype), attention_bias=m.add_bias_linear)

    def model_config(self, hf):
        m = LlamaLike.model_config(self, hf)
        m.qk_layernorm = True
        return m
