"""Hugging Face interop: ``megalm-export-hf`` writes a transformers directory (GPT-2, Llama (with Llama 3.1's RoPE
scaling), Mistral, Qwen2/2.5, Qwen3, Mixtral or Qwen3-MoE: safetensors weights, config.json, the run's tokenizer
files) from a checkpoint of any layout; ``megalm-import-hf`` turns such a directory into a megalm checkpoint that
loads under any layout. What distinguishes the families is a model option each (``--add-qkv-bias``,
``--qk-layernorm``, ``--sliding-window``, ``--use-rope-scaling``), not a special case here.

Checkpoints already hold whole, unpadded tensors under global names, so conversion is renaming: GPT-2's fused
``c_attn`` is our ``wq|wk|wv`` stacked and its Conv1D weights are transposed; Llama's names map one to one (our
RoPE uses the same half-split layout). transformers itself is not needed here, only to load the result.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

import torch

from megalm.config import Config, ModelConfig
from megalm.training.checkpoint import CheckpointError, read_checkpoint

log = logging.getLogger("megalm")


class ConversionError(ValueError):
    pass


def flavour(m: ModelConfig) -> str:
    """'gpt2', or a Llama-like family: 'llama', 'mistral' (a sliding window), 'qwen2' (query/key/value biases
    only), 'qwen3' (QK normalisation), 'mixtral' (every MLP a mixture of experts as Mixtral routes them) or
    'qwen3_moe' (QK normalisation, MoE in any layers); or a ConversionError naming what none of them has."""
    if (m.position_embedding_type, m.normalization, m.swiglu) == ("learned_absolute", "LayerNorm", False):
        mha = m.num_query_groups == m.num_attention_heads
        if not m.add_bias_linear or m.untie_embeddings_and_output_weights or not mha:
            raise ConversionError("GPT-2 needs biases, tied embeddings and one key/value head per query head")
        return "gpt2"
    if (m.position_embedding_type, m.normalization, m.swiglu) == ("rope", "RMSNorm", True):
        if m.add_qkv_bias and (m.qk_layernorm or m.num_experts or m.add_bias_linear):
            raise ConversionError("--add-qkv-bias (Qwen2) goes with --disable-bias-linear, without --qk-layernorm "
                                  "or experts")
        if not m.num_experts:
            family = "qwen3" if m.qk_layernorm else "qwen2" if m.add_qkv_bias else \
                "mistral" if m.sliding_window else "llama"
            if family == "mistral" and m.add_bias_linear:
                raise ConversionError("Mistral (--sliding-window) has no biases: add --disable-bias-linear")
            return family
        family = "qwen3_moe" if m.qk_layernorm else "mixtral"
        unlike = [what for what, differs in (
            ("MoE in every layer (--moe-layer-freq)", family == "mixtral" and not all(m.moe_layers())),
            ("no shared expert", m.moe_shared_expert_intermediate_size),
            ("softmax router scores (no sigmoid)", m.moe_router_score_function != "softmax"),
            ("top-k of the logits then softmax (no --moe-router-pre-softmax)",
             family == "mixtral" and m.moe_router_pre_softmax),
            ("no group-limited routing", m.moe_router_num_groups), ("no expert bias", m.moe_router_enable_expert_bias),
            ("no biases (--disable-bias-linear)", m.add_bias_linear)) if differs]
        if unlike:
            raise ConversionError(f"{ARCHITECTURES[family]} needs " + "; ".join(unlike))
        return family
    raise ConversionError(f"no transformers architecture for position {m.position_embedding_type}, "
                          f"{m.normalization}, swiglu={m.swiglu}: export supports the GPT-2 flavour "
                          f"(learned, LayerNorm, GELU) and the Llama flavour (rope, RMSNorm, SwiGLU)")


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
QWEN = ("qwen2", "qwen3", "qwen3_moe")  # their window: use_sliding_window, and which layers have it


def hf_config(m: ModelConfig, vocab: int, eod: int, dtype: str = "float32") -> dict:
    if flavour(m) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
                "n_positions": m.max_position_embeddings, "n_embd": m.hidden_size, "n_layer": m.num_layers,
                "n_head": m.num_attention_heads, "n_inner": m.ffn_hidden_size,
                "activation_function": "gelu_new" if m.gelu_approximation == "tanh" else "gelu",
                "layer_norm_epsilon": m.norm_epsilon, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "initializer_range": m.init_method_std, "bos_token_id": eod, "eos_token_id": eod,
                "tie_word_embeddings": True, "torch_dtype": dtype}
    family = flavour(m)
    out = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": vocab,
           "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
           "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_query_groups,
           "head_dim": m.head_dim, "max_position_embeddings": m.max_position_embeddings,
           "rms_norm_eps": m.norm_epsilon, "hidden_act": "silu",
           "tie_word_embeddings": not m.untie_embeddings_and_output_weights, "initializer_range": m.init_method_std,
           "bos_token_id": eod, "eos_token_id": eod, "torch_dtype": dtype, "rope_theta": m.rotary_base}
    if family != "llama":
        out["sliding_window"] = m.sliding_window
    if m.use_rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                               "low_freq_factor": m.rope_scaling_low_freq_factor,
                               "high_freq_factor": m.rope_scaling_high_freq_factor,
                               "original_max_position_embeddings": m.rope_scaling_original_max_position_embeddings}
    if family in QWEN:  # a window on every layer, or none
        out.update(use_sliding_window=m.sliding_window is not None, max_window_layers=0,
                   layer_types=["sliding_attention" if m.sliding_window else "full_attention"] * m.num_layers)
    if family in ("llama", "qwen3"):
        out.update(attention_bias=m.add_bias_linear)
    if family == "llama":
        return dict(out, mlp_bias=m.add_bias_linear)
    if family in ("mistral", "qwen2", "qwen3"):
        return out
    out.update(num_experts_per_tok=m.moe_router_topk, router_aux_loss_coef=m.moe_aux_loss_coeff,
               output_router_logits=False)
    if family == "mixtral":
        return dict(out, intermediate_size=m.moe_ffn_hidden_size, num_local_experts=m.num_experts)
    return dict(out, moe_intermediate_size=m.moe_ffn_hidden_size, num_experts=m.num_experts, attention_bias=False,
                norm_topk_prob=not m.moe_router_pre_softmax, decoder_sparse_step=1,
                mlp_only_layers=[i for i, on in enumerate(m.moe_layers()) if not on])


def _gpt2_names(layers: int):
    """(megalm name, HF name, transpose) for every tensor but the fused attention."""
    pairs = [("embedding.weight", "transformer.wte.weight", False),
             ("position_embedding.weight", "transformer.wpe.weight", False),
             ("final_norm.weight", "transformer.ln_f.weight", False),
             ("final_norm.bias", "transformer.ln_f.bias", False)]
    for i in range(layers):
        a, h = f"layers.{i}.", f"transformer.h.{i}."
        pairs += [(a + "attention_norm.weight", h + "ln_1.weight", False),
                  (a + "attention_norm.bias", h + "ln_1.bias", False),
                  (a + "attention.wo.weight", h + "attn.c_proj.weight", True),
                  (a + "attention.wo.bias", h + "attn.c_proj.bias", False),
                  (a + "mlp_norm.weight", h + "ln_2.weight", False), (a + "mlp_norm.bias", h + "ln_2.bias", False),
                  (a + "mlp.w1.weight", h + "mlp.c_fc.weight", True), (a + "mlp.w1.bias", h + "mlp.c_fc.bias", False),
                  (a + "mlp.w2.weight", h + "mlp.c_proj.weight", True),
                  (a + "mlp.w2.bias", h + "mlp.c_proj.bias", False)]
    return pairs


# where each MoE family keeps its router and experts (megalm's w1 / w3 / w2: gate, up, down)
MOE_NAMES = {"mixtral": ("block_sparse_moe.gate", "block_sparse_moe.experts.{}.", ("w1", "w3", "w2")),
             "qwen3_moe": ("mlp.gate", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj"))}


def _llama_names(m: ModelConfig):
    """(megalm name, HF name) of the Llama-like families, all but the experts (``_experts``)."""
    family = flavour(m)
    moe = m.moe_layers()
    pairs = [("embedding.weight", "model.embed_tokens.weight"), ("final_norm.weight", "model.norm.weight")]
    if m.untie_embeddings_and_output_weights:
        pairs.append(("output.weight", "lm_head.weight"))
    biases = ("weight", "bias") if m.add_bias_linear else ("weight",)
    qkv_biases = ("weight", "bias") if m.add_bias_linear or m.add_qkv_bias else ("weight",)
    for i in range(m.num_layers):
        a, h = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(a + "attention_norm.weight", h + "input_layernorm.weight"),
                  (a + "mlp_norm.weight", h + "post_attention_layernorm.weight")]
        mlp = () if moe[i] else (("mlp.w1", "mlp.gate_proj"), ("mlp.w3", "mlp.up_proj"), ("mlp.w2", "mlp.down_proj"))
        for ours, theirs in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                             ("attention.wv", "self_attn.v_proj")):
            pairs += [(f"{a}{ours}.{leaf}", f"{h}{theirs}.{leaf}") for leaf in qkv_biases]
        for ours, theirs in (("attention.wo", "self_attn.o_proj"), *mlp):
            pairs += [(f"{a}{ours}.{leaf}", f"{h}{theirs}.{leaf}") for leaf in biases]
        if m.qk_layernorm:
            pairs += [(a + "attention.q_norm.weight", h + "self_attn.q_norm.weight"),
                      (a + "attention.k_norm.weight", h + "self_attn.k_norm.weight")]
        if moe[i]:
            pairs.append((a + "mlp.router.weight", h + MOE_NAMES[family][0] + ".weight"))
    return pairs


def _experts(m: ModelConfig):
    """(megalm stacked name ``[E, in, out]``, HF per-expert name pattern ``[out, in]``) of every expert matrix."""
    if not m.num_experts:
        return []
    _, prefix, names = MOE_NAMES[flavour(m)]
    return [(f"layers.{i}.mlp.experts.{w}", f"model.layers.{i}.{prefix}{theirs}.weight")
            for i, on in enumerate(m.moe_layers()) if on for w, theirs in zip(("w1", "w3", "w2"), names)]


def to_hf(m: ModelConfig, state: dict) -> dict:
    """transformers state dict from megalm's full-tensor state."""
    out = {}
    if flavour(m) != "gpt2":
        for ours, theirs in _llama_names(m):
            out[theirs] = state[ours]
        for ours, theirs in _experts(m):
            for e, matrix in enumerate(state[ours]):
                out[theirs.format(e)] = matrix.t()
        return {k: v.contiguous() for k, v in out.items()}
    for ours, theirs, transpose in _gpt2_names(m.num_layers):
        out[theirs] = state[ours].t() if transpose else state[ours]
    for i in range(m.num_layers):
        a, h = f"layers.{i}.attention.", f"transformer.h.{i}.attn."
        out[h + "c_attn.weight"] = torch.cat([state[a + w + ".weight"] for w in ("wq", "wk", "wv")]).t()
        out[h + "c_attn.bias"] = torch.cat([state[a + w + ".bias"] for w in ("wq", "wk", "wv")])
    return {k: v.contiguous() for k, v in out.items()}


def from_hf(m: ModelConfig, hf: dict) -> dict:
    """megalm's full-tensor state from a transformers state dict (inverse of ``to_hf``)."""
    out = {}
    if flavour(m) != "gpt2":
        for ours, theirs in _llama_names(m):
            out[ours] = hf[theirs]
        for ours, theirs in _experts(m):
            out[ours] = torch.stack([hf[theirs.format(e)].t() for e in range(m.num_experts)])
        return {k: v.float().contiguous() for k, v in out.items()}
    for ours, theirs, transpose in _gpt2_names(m.num_layers):
        out[ours] = hf[theirs].t() if transpose else hf[theirs]
    for i in range(m.num_layers):
        a, h = f"layers.{i}.attention.", f"transformer.h.{i}.attn."
        for leaf, tensor in (("weight", hf[h + "c_attn.weight"].t()), ("bias", hf[h + "c_attn.bias"])):
            for name, part in zip(("wq", "wk", "wv"), tensor.split(m.hidden_size)):
                out[f"{a}{name}.{leaf}"] = part
    return {k: v.float().contiguous() for k, v in out.items()}


# config.json keys that do not change what the model computes from its weights: metadata, generation and
# training-only settings (dropout). Anything else must be implemented below or the import stops with its name.
NEUTRAL_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache", "initializer_range",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "tokenizer_class", "task_specific_params", "finetuning_task", "prefix", "vocab_size", "attn_pdrop",
    "embd_pdrop", "resid_pdrop", "attention_dropout", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "reorder_and_upcast_attn", "n_ctx", "pretraining_tp",
    "max_position_embeddings", "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder",
    "is_decoder", "pruned_heads", "tie_encoder_decoder", "use_return_dict",
}
GPT2_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _refuse_unknown(hf: dict, implemented: set) -> None:
    unknown = sorted(k for k in hf if k not in NEUTRAL_KEYS | implemented)
    if unknown:
        raise ConversionError(f"config.json: {', '.join(f'{k}={hf[k]!r}' for k in unknown)}: not implemented by "
                              f"megalm; importing anyway could give other logits than transformers, so it stops")


def _require(hf: dict, key: str, allowed, default) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise ConversionError(f"config.json: {key}={value!r} is not implemented by megalm (it supports "
                              f"{', '.join(map(repr, allowed))})")


LLAMA3_ROPE = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_scaling_low_freq_factor",
               "high_freq_factor": "rope_scaling_high_freq_factor",
               "original_max_position_embeddings": "rope_scaling_original_max_position_embeddings"}


def _rope(hf: dict, m: ModelConfig) -> None:
    """RoPE from either spelling: ``rope_theta`` + ``rope_scaling`` (transformers 4) or ``rope_parameters``
    (transformers 5): the base frequency, and Llama 3.1's scaling (``rope_type`` llama3); any other scaling, or a
    setting of it megalm does not know, is refused by name."""
    m.rotary_base = float(hf.get("rope_theta", 10000.0))
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if not params:
            continue
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ConversionError(f"config.json: {key}.rope_type={kind!r} (RoPE scaling) is not implemented by "
                                  f"megalm; unscaled RoPE and rope_type 'llama3' are")
        known = {"rope_type", "type", "rope_theta"} | (set(LLAMA3_ROPE) if kind == "llama3" else set())
        other = sorted(set(params) - known)
        if other:
            raise ConversionError(f"config.json: {key} holds {', '.join(other)}, not implemented by megalm "
                                  f"for rope_type {kind!r}")
        m.rotary_base = float(params.get("rope_theta", m.rotary_base))
        if kind == "llama3":
            m.use_rope_scaling = True
            for theirs, ours in LLAMA3_ROPE.items():
                if theirs not in params:
                    raise ConversionError(f"config.json: {key} with rope_type 'llama3' lacks {theirs}")
                setattr(m, ours, type(getattr(m, ours))(params[theirs]))


def _window(hf: dict, kind: str, layers: int):
    """The sliding window every layer uses, or None: Mistral's and Mixtral's ``sliding_window``; for Qwen only
    with ``use_sliding_window`` and on the layers ``layer_types`` (or ``max_window_layers``) name. A window on
    some layers only is refused by name."""
    window = hf.get("sliding_window")
    if kind in QWEN and not hf.get("use_sliding_window", False):
        return None  # Qwen2 configs carry a sliding_window they do not use
    types = hf.get("layer_types")
    if types is None and kind in QWEN:
        types = ["sliding_attention" if i >= hf.get("max_window_layers", layers) else "full_attention"
                 for i in range(layers)]
    kinds = set(types or [])
    if kinds - {"sliding_attention", "full_attention"} or len(kinds) > 1:
        raise ConversionError(f"config.json: layer_types={types!r} (max_window_layers="
                              f"{hf.get('max_window_layers')!r}): a window on some layers only is not implemented "
                              f"by megalm; one window on every layer, or none, is")
    if kinds == {"full_attention"}:
        return None
    return int(window) if window is not None else None


def model_config_from_hf(hf: dict) -> ModelConfig:
    """megalm's model config from a transformers config.json; every key that would change the computation and
    that megalm does not implement stops the import, named."""
    m = ModelConfig()
    kind = hf.get("model_type")
    if kind == "gpt2":
        _refuse_unknown(hf, {"n_layer", "n_embd", "n_head", "n_inner", "n_positions", "layer_norm_epsilon",
                             "activation_function", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                             "add_cross_attention"})
        _require(hf, "activation_function", tuple(GPT2_GELU), "gelu_new")
        _require(hf, "scale_attn_weights", (True,), True)
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), False)
        _require(hf, "add_cross_attention", (False,), False)
        m.num_layers, m.hidden_size, m.num_attention_heads = hf["n_layer"], hf["n_embd"], hf["n_head"]
        m.ffn_hidden_size = hf.get("n_inner") or 4 * hf["n_embd"]
        m.max_position_embeddings = m.seq_length = hf["n_positions"]
        m.norm_epsilon = hf.get("layer_norm_epsilon", 1e-5)
        m.num_query_groups = m.num_attention_heads
        m.gelu_approximation = GPT2_GELU[hf.get("activation_function", "gelu_new")]
        return m
    if kind in ARCHITECTURES:
        window = {"sliding_window"} if kind != "llama" else set()
        qwen = {"use_sliding_window", "max_window_layers", "layer_types"} if kind in QWEN else set()
        mixtral = {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits",
                   "router_jitter_noise"} if kind == "mixtral" else set()
        qwen3_moe = {"num_experts", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                     "output_router_logits", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                     "mlp_only_layers"} if kind == "qwen3_moe" else set()
        _refuse_unknown(hf, {"num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                             "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                             "hidden_act", "head_dim"} | ({"attention_bias", "mlp_bias"} if kind == "llama" else set())
                        | ({"attention_bias"} if kind in ("qwen3", "qwen3_moe") else set())
                        | window | qwen | mixtral | qwen3_moe)
        _require(hf, "hidden_act", ("silu",), "silu")
        m.position_embedding_type, m.normalization, m.swiglu = "rope", "RMSNorm", True
        m.num_layers, m.hidden_size = hf["num_hidden_layers"], hf["hidden_size"]
        m.num_attention_heads = hf["num_attention_heads"]
        m.num_query_groups = hf.get("num_key_value_heads") or m.num_attention_heads
        m.ffn_hidden_size = hf["intermediate_size"]
        m.max_position_embeddings = m.seq_length = hf.get("max_position_embeddings", 2048)
        m.norm_epsilon = hf.get("rms_norm_eps", 1e-6)
        _rope(hf, m)
        m.untie_embeddings_and_output_weights = not hf.get("tie_word_embeddings", False)
        m.add_bias_linear = bool(hf.get("attention_bias", False))
        _require(hf, "mlp_bias", (m.add_bias_linear,), m.add_bias_linear)
        if hf.get("head_dim") not in (None, m.head_dim):
            m.kv_channels = hf["head_dim"]  # a head width of its own (Qwen3)
        m.sliding_window = _window(hf, kind, m.num_layers)
        m.add_qkv_bias = kind == "qwen2"  # Qwen2's q, k and v projections always have biases, nothing else
        m.qk_layernorm = kind in ("qwen3", "qwen3_moe")
        if kind == "qwen3_moe":
            m.num_experts = hf.get("num_experts") or hf["num_local_experts"]
            m.moe_router_topk, m.moe_ffn_hidden_size = hf["num_experts_per_tok"], hf["moe_intermediate_size"]
            m.moe_router_pre_softmax = not hf.get("norm_topk_prob", False)
            m.moe_aux_loss_coeff = float(hf.get("router_aux_loss_coef", 0.0))
            step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
            m.moe_layer_freq = " ".join("1" if i not in dense and (i + 1) % step == 0 else "0"
                                        for i in range(m.num_layers))
        if kind == "mixtral":
            m.num_experts, m.moe_router_topk = hf["num_local_experts"], hf["num_experts_per_tok"]
            m.moe_ffn_hidden_size = m.ffn_hidden_size
            m.moe_aux_loss_coeff = float(hf.get("router_aux_loss_coef", 0.0))
        return m
    raise ConversionError(f"config.json: model_type {kind!r} is not supported (gpt2, "
                          f"{', '.join(ARCHITECTURES)})")


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer.model")


def _tokenizer_files(cfg: Config) -> list:
    d = cfg.data
    paths = [d.vocab_file, d.merge_file, d.tokenizer_model]
    dirs = {os.path.dirname(p) for p in paths if p and os.path.isfile(p)} | {p for p in paths if p and os.path.isdir(p)}
    found = [p for p in paths if p and os.path.isfile(p)]
    for folder in dirs:  # the tokenizer.json megalm-train-tokenizer writes beside vocab.json/merges.txt
        found += [os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]
    return sorted(set(found))


def export_hf(load: str, output: str) -> str:
    from safetensors.torch import save_file

    from megalm.data.tokenizers import build_tokenizer

    state = read_checkpoint(load, parts=("model",))
    cfg = state["config"]
    tok = build_tokenizer(cfg.data)
    weights = to_hf(cfg.model, state["model"])  # in the checkpoint's dtype: bf16 from a --bf16 run
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    os.makedirs(output, exist_ok=True)
    save_file(weights, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(output, "config.json"), "w") as fh:
        json.dump(hf_config(cfg.model, tok.vocab_size, tok.eod, dtype), fh, indent=1)
    for path in _tokenizer_files(cfg):
        shutil.copy(path, os.path.join(output, os.path.basename(path)))
    eos = tok.detokenize([tok.eod]) if cfg.data.tokenizer_type != "NullTokenizer" else None
    with open(os.path.join(output, "tokenizer_config.json"), "w") as fh:
        json.dump({"model_max_length": cfg.model.max_position_embeddings, "eos_token": eos, "bos_token": eos,
                   "unk_token": eos, "add_prefix_space": False}, fh, indent=1)
    log.info("exported %s (%s flavour) to %s", state["path"], flavour(cfg.model), output)
    return output


def _read_hf_weights(folder: str) -> dict:
    st = os.path.join(folder, "model.safetensors")
    if os.path.exists(st):
        from safetensors.torch import load_file

        return load_file(st)
    binary = os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ConversionError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded checkpoints: merge first)")


def import_hf(folder: str, save: str) -> str:
    from megalm.data.tokenizers import build_tokenizer
    from megalm.model.gpt import GPT
    from megalm.parallel.state import Topology
    from megalm.training.checkpoint import load_model_state, save_checkpoint

    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise ConversionError(f"{folder}: no config.json")
    with open(config_path) as fh:
        hf = json.load(fh)
    cfg = Config()
    cfg.model = model_config_from_hf(hf)
    tok_dir = os.path.join(save, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    for f in TOKENIZER_FILES:
        if os.path.exists(os.path.join(folder, f)):
            shutil.copy(os.path.join(folder, f), os.path.join(tok_dir, f))
    d = cfg.data
    if all(os.path.exists(os.path.join(tok_dir, f)) for f in ("vocab.json", "merges.txt")):
        d.tokenizer_type, d.vocab_file, d.merge_file = ("GPT2BPETokenizer", os.path.join(tok_dir, "vocab.json"),
                                                        os.path.join(tok_dir, "merges.txt"))
    elif os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        d.tokenizer_type, d.tokenizer_model = "HuggingFaceTokenizer", os.path.join(tok_dir, "tokenizer.json")
    elif os.path.exists(os.path.join(tok_dir, "tokenizer.model")):
        d.tokenizer_type, d.tokenizer_model = "SentencePieceTokenizer", os.path.join(tok_dir, "tokenizer.model")
    else:
        raise ConversionError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    tok = build_tokenizer(d)
    state = from_hf(cfg.model, _read_hf_weights(folder))
    for name in ("embedding.weight", "output.weight"):
        if name in state:
            rows = state[name].shape[0]
            if rows < tok.vocab_size:
                raise ConversionError(f"{folder}: {rows} embedding rows for a tokenizer of {tok.vocab_size}")
            state[name] = state[name][: tok.vocab_size]  # rows past the tokenizer are padding
    model = GPT(cfg.model, tok.vocab_size, Topology())
    load_model_state(model, state, Topology(), folder)
    meta = {"consumed_samples": 0, "tokenizer": tok.fingerprint, "imported_from": os.path.abspath(folder)}
    path = save_checkpoint(save, 0, model, {}, cfg, Topology(), meta, {})
    log.info("imported %s (%s) into %s", folder, hf.get("model_type"), path)
    return path


def _cli(argv, prog: str, description: str, flags: list, action, errors: tuple) -> int:
    """One command: ``flags`` are (name, help) pairs, all required; ``action`` gets their values in order."""
    from megalm.training.logging import setup_logging

    p = argparse.ArgumentParser(prog=prog, description=description)
    for name, help_text in flags:
        p.add_argument(name, required=True, help=help_text)
    args = vars(p.parse_args(argv))
    setup_logging(0)
    try:
        action(*(args[name.lstrip("-").replace("-", "_")] for name, _ in flags))
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def export_main(argv=None) -> int:
    return _cli(argv, "megalm-export-hf", "megalm checkpoint -> transformers directory",
                [("--load", "checkpoint (a --save root or an iter_* directory), any layout"),
                 ("--output", "directory to write")], export_hf, (CheckpointError, ConversionError, FileNotFoundError))


def import_main(argv=None) -> int:
    return _cli(argv, "megalm-import-hf", "transformers directory -> megalm checkpoint",
                [("--input", "local directory with config.json and model.safetensors"),
                 ("--save", "checkpoint directory to write (iteration 0)")], import_hf,
                (CheckpointError, ConversionError, FileNotFoundError, KeyError))


if __name__ == "__main__":
    sys.exit(export_main())
