"""The mixture-of-experts families: Mixtral, Qwen3-MoE and GLM-4.5, on the Llama-like base."""
from __future__ import annotations

import logging
from typing import Optional

from megalm.interop.families.base import ConversionError, Copy, Experts, Interleaved, Rename, require
from megalm.interop.families.dense import LlamaLike, Qwen2, rope_scaling

log = logging.getLogger("megalm")


class MoEFamily(LlamaLike):
    """Llama-like with routed experts: where the router and the experts live, and what routing it has."""
    moe = True
    router = ""  # the router's module under each layer
    expert = ""  # one expert's module, with {} for its index
    expert_names = ("", "", "")  # its gate, up and down projections (megalm's w1, w3, w2)
    adds_keys = frozenset({"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
                           "output_router_logits"})
    some_dense_layers = True  # False: every layer's MLP is a mixture of experts
    pre_softmax_allowed = True  # --moe-router-pre-softmax (softmax over all experts, then top-k) is theirs too

    def check(self, m):
        super().check(m)
        unlike = [what for what, differs in (
            ("MoE in every layer (--moe-layer-freq)", not self.some_dense_layers and not all(m.moe_layers())),
            ("no shared expert", m.moe_shared_expert_intermediate_size),
            ("top-k of the logits then softmax (no --moe-router-pre-softmax)",
             not self.pre_softmax_allowed and m.moe_router_pre_softmax),
            ("no group-limited routing", m.moe_router_num_groups), ("no expert bias", m.moe_router_enable_expert_bias),
            ("no biases (--disable-bias-linear)", m.add_bias_linear)) if differs]
        if unlike:
            raise ConversionError(f"{self.architecture} needs " + "; ".join(unlike))

    def hf_config(self, m, vocab, eod, dtype):
        return dict(super().hf_config(m, vocab, eod, dtype), num_experts_per_tok=m.moe_router_topk,
                    router_aux_loss_coef=m.moe_aux_loss_coeff, output_router_logits=False)

    def model_config(self, hf):
        m = super().model_config(hf)
        m.moe_aux_loss_coeff = float(hf.get("router_aux_loss_coef", 0.0))
        return m

    def moe_renames(self, m, ours, theirs):
        out = [Rename(ours + "mlp.router.weight", theirs + self.router + ".weight")]
        return out + [Experts(f"{ours}mlp.experts.{w}", f"{theirs}{self.expert}{name}.weight", m.num_experts)
                      for w, name in zip(("w1", "w3", "w2"), self.expert_names)]


class Mixtral(MoEFamily):
    model_type, architecture = "mixtral", "MixtralForCausalLM"
    adds_keys = frozenset({"sliding_window", "router_jitter_noise"})
    router, expert, expert_names = "block_sparse_moe.gate", "block_sparse_moe.experts.{}.", ("w1", "w3", "w2")
    some_dense_layers = False
    pre_softmax_allowed = False

    def claims(self, m):
        return super().claims(m) and not m.qk_layernorm and m.moe_router_score_function == "softmax"

    def hf_config(self, m, vocab, eod, dtype):
        return dict(super().hf_config(m, vocab, eod, dtype), intermediate_size=m.moe_ffn_hidden_size,
                    num_local_experts=m.num_experts)

    def model_config(self, hf):
        m = super().model_config(hf)
        m.num_experts, m.moe_router_topk = hf["num_local_experts"], hf["num_experts_per_tok"]
        m.moe_ffn_hidden_size = m.ffn_hidden_size
        return m


class Qwen3MoE(MoEFamily):
    model_type, architecture = "qwen3_moe", "Qwen3MoeForCausalLM"
    adds_keys = frozenset({"attention_bias", "num_experts", "moe_intermediate_size", "norm_topk_prob",
                           "decoder_sparse_step", "mlp_only_layers"} | Qwen2.adds_keys)
    router, expert, expert_names = "mlp.gate", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj")
    qwen_window = True

    def claims(self, m):
        return super().claims(m) and m.qk_layernorm and m.moe_router_score_function == "softmax"

    def hf_config(self, m, vocab, eod, dtype):
        return dict(super().hf_config(m, vocab, eod, dtype), moe_intermediate_size=m.moe_ffn_hidden_size,
                    num_experts=m.num_experts, attention_bias=False, norm_topk_prob=not m.moe_router_pre_softmax,
                    decoder_sparse_step=1, mlp_only_layers=[i for i, on in enumerate(m.moe_layers()) if not on])

    def model_config(self, hf):
        m = super().model_config(hf)
        m.qk_layernorm = True
        m.num_experts = hf.get("num_experts") or hf["num_local_experts"]
        m.moe_router_topk, m.moe_ffn_hidden_size = hf["num_experts_per_tok"], hf["moe_intermediate_size"]
        m.moe_router_pre_softmax = not hf.get("norm_topk_prob", False)
        step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
        m.moe_layer_freq = " ".join("1" if i not in dense and (i + 1) % step == 0 else "0"
                                    for i in range(m.num_layers))
        return m


class Glm4MoE(MoEFamily):
    """GLM-4.5 / 4.5-Air: DeepSeek-V3's router (sigmoid scores, group-limited top-k, the expert bias as
    ``e_score_correction_bias``, ``routed_scaling_factor``), a shared expert, the first layers dense, partial RoPE,
    optional QK norms, biases on q/k/v only. Its multi-token-prediction layers (``num_nextn_predict_layers``) are not
    part of transformers' model, which drops them on load (and from the files it saves); where the files hold them
    (DeepSeek's layout: ``model.layers.<num_layers + k>.`` with ``eh_proj``, ``enorm``, ``hnorm``,
    ``shared_head.norm``, copies of the embedding and output layer, and one decoder layer) they are megalm's
    ``--mtp-num-layers`` modules, both ways."""
    model_type, architecture = "glm4_moe", "Glm4MoeForCausalLM"
    mtp = True
    adds_keys = frozenset({"attention_bias", "moe_intermediate_size", "n_shared_experts", "n_routed_experts",
                           "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
                           "norm_topk_prob", "use_qk_norm", "num_nextn_predict_layers", "partial_rotary_factor"})
    router, expert, expert_names = "mlp.gate", "mlp.experts.{}.", ("gate_proj", "up_proj", "down_proj")
    has_window_key = False
    rope_keys = frozenset({"partial_rotary_factor"})

    def claims(self, m):
        return super().claims(m) and m.moe_router_score_function == "sigmoid"

    def check(self, m):
        unlike = [what for what, differs in (
            ("the first layers dense and MoE after them (--moe-layer-freq)", not self._dense_prefix(m)),
            ("a shared expert of a multiple of --moe-ffn-hidden-size", not m.moe_shared_expert_intermediate_size
             or m.moe_shared_expert_intermediate_size % m.moe_ffn_hidden_size),
            ("group scores from each group's top 2 (--moe-router-topk / --moe-router-group-topk = 2)",
             m.moe_router_num_groups and m.moe_router_topk // m.moe_router_group_topk != 2),
            ("q/k/v biases only (--add-qkv-bias with --disable-bias-linear, or no biases)", m.add_bias_linear),
            ("the expert bias (--moe-router-enable-expert-bias: transformers' e_score_correction_bias)",
             not m.moe_router_enable_expert_bias),
            ("no --moe-router-pre-softmax", m.moe_router_pre_softmax), ("no window", m.sliding_window)) if differs]
        if unlike:
            raise ConversionError(f"{self.architecture} needs " + "; ".join(unlike))

    @staticmethod
    def _dense_prefix(m) -> Optional[int]:
        """How many leading layers are dense, when every later one is MoE (else None)."""
        layers = m.moe_layers()
        first = layers.index(True) if True in layers else None
        return first if first is not None and all(layers[first:]) else None

    def hf_config(self, m, vocab, eod, dtype):
        out = LlamaLike.hf_config(self, m, vocab, eod, dtype)
        out.pop("rope_theta")
        out.pop("rope_scaling", None)
        out.update(rope_parameters={"rope_type": "default", **(rope_scaling(m) or {}), "rope_theta": m.rotary_base,
                                    "partial_rotary_factor": m.rotary_percent},
                   attention_bias=m.add_qkv_bias, moe_intermediate_size=m.moe_ffn_hidden_size,
                   n_routed_experts=m.num_experts, num_experts_per_tok=m.moe_router_topk,
                   n_shared_experts=m.moe_shared_expert_intermediate_size // m.moe_ffn_hidden_size,
                   routed_scaling_factor=m.moe_router_topk_scaling_factor or 1.0,
                   n_group=m.moe_router_num_groups or 1, topk_group=m.moe_router_group_topk or 1,
                   first_k_dense_replace=self._dense_prefix(m), norm_topk_prob=True, use_qk_norm=m.qk_layernorm,
                   num_nextn_predict_layers=m.mtp_num_layers or 0, output_router_logits=False)
        return out

    def model_config(self, hf):
        m = LlamaLike.model_config(self, hf)
        require(hf, "norm_topk_prob", (True,), True)
        m.rotary_percent = float((hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                                       hf.get("partial_rotary_factor", 1.0)))
        m.add_qkv_bias, m.add_bias_linear = bool(hf.get("attention_bias", False)), False
        m.qk_layernorm = bool(hf.get("use_qk_norm", False))
        m.num_experts, m.moe_router_topk = hf["n_routed_experts"], hf["num_experts_per_tok"]
        m.moe_ffn_hidden_size = hf["moe_intermediate_size"]
        m.moe_shared_expert_intermediate_size = hf.get("n_shared_experts", 1) * m.moe_ffn_hidden_size or None
        m.moe_router_score_function, m.moe_router_enable_expert_bias = "sigmoid", True
        factor = float(hf.get("routed_scaling_factor", 1.0))
        m.moe_router_topk_scaling_factor = factor if factor != 1.0 else None
        groups, group_topk = hf.get("n_group", 1), hf.get("topk_group", 1)
        if groups > 1:  # one group is no limit at all
            if m.moe_router_topk // group_topk != 2:
                raise ConversionError(f"config.json: n_group={groups}, topk_group={group_topk}, "
                                      f"num_experts_per_tok={m.moe_router_topk}: transformers scores a group by its "
                                      f"top 2 experts, megalm (as Megatron) by its top num_experts_per_tok / "
                                      f"topk_group; they agree only when that is 2")
            m.moe_router_num_groups, m.moe_router_group_topk = groups, group_topk
        dense = hf.get("first_k_dense_replace", 0)
        m.moe_layer_freq = " ".join("0" if i < dense else "1" for i in range(m.num_layers))
        m.mtp_num_layers = hf.get("num_nextn_predict_layers") or None
        return m

    def fit_to_weights(self, m, weights):
        if m.mtp_num_layers and f"model.layers.{m.num_layers}.eh_proj.weight" not in weights:
            log.warning("config.json names %d multi-token prediction layer(s) but the files hold none (transformers "
                        "drops them): imported without", m.mtp_num_layers)
            m.mtp_num_layers = None

    def renames(self, m):
        out = super().renames(m)
        head = ("output.weight", "lm_head.weight") if m.untie_embeddings_and_output_weights else \
            ("embedding.weight", "model.embed_tokens.weight")
        for k in range(m.mtp_num_layers or 0):
            a, h = f"mtp.{k}.", f"model.layers.{m.num_layers + k}."
            out += [Rename(a + "enorm.weight", h + "enorm.weight"), Rename(a + "hnorm.weight", h + "hnorm.weight"),
                    Rename(a + "eh_proj.weight", h + "eh_proj.weight"),
                    Rename(a + "final_norm.weight", h + "shared_head.norm.weight"),
                    Copy("embedding.weight", h + "embed_tokens.weight", "model.embed_tokens.weight"),
                    Copy(head[0], h + "shared_head.head.weight", head[1])]
            out += self.layer_renames(m, a + "layer.", h, m.moe_layers()[-1])
        return out

    def moe_renames(self, m, ours, theirs):
        out = super().moe_renames(m, ours, theirs)
        out.append(Rename(ours + "mlp.router.expert_bias", theirs + "mlp.gate.e_score_correction_bias"))
        return out + [Rename(f"{ours}mlp.shared.{w}.weight", f"{theirs}mlp.shared_experts.{name}.weight")
                      for w, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]


class GptOss(MoEFamily):
    """GPT-OSS: attention sinks (``--softmax-type learnable``, so ``--attention-backend unfused``), biases on q/k/v/o,
    router and experts, windowed and full layers alternating, YaRN, and its clamped SwiGLU (``--quick-geglu
    --glu-linear-offset 1 --activation-func-clamp-value 7``); every MLP a mixture of experts, stored fused:
    ``gate_up_proj`` ``[E, hidden, 2 width]`` with gate and linear columns interleaved, ``down_proj``
    ``[E, width, hidden]``, the orientation of megalm's own stacks."""
    model_type, architecture = "gpt_oss", "GptOssForCausalLM"
    adds_keys = frozenset({"sliding_window", "layer_types", "attention_bias", "swiglu_alpha", "swiglu_limit",
                           "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits"})
    has_window_key, qwen_window = True, True  # its window is per layer, by layer_types (always present)
    softmax_type = "learnable"

    def check(self, m):
        unlike = [what for what, differs in (
            ("every MLP a mixture of experts (--moe-layer-freq)", not all(m.moe_layers())),
            ("biases in linear layers (no --disable-bias-linear)", not m.add_bias_linear),
            ("--quick-geglu --glu-linear-offset 1", not m.quick_geglu or m.glu_linear_offset != 1.0),
            ("softmax router scores without --moe-router-pre-softmax",
             m.moe_router_score_function != "softmax" or m.moe_router_pre_softmax),
            ("no shared expert, group-limited routing or expert bias", m.moe_shared_expert_intermediate_size or
             m.moe_router_num_groups or m.moe_router_enable_expert_bias),
            ("no QK norms", m.qk_layernorm), ("RoPE on every dim", m.rotary_percent != 1.0)) if differs]
        if unlike:
            raise ConversionError(f"{self.architecture} needs " + "; ".join(unlike))

    def hf_config(self, m, vocab, eod, dtype):
        out = LlamaLike.hf_config(self, m, vocab, eod, dtype)
        out.pop("use_sliding_window"), out.pop("max_window_layers")
        out.pop("rope_scaling", None)
        out.update(rope_parameters={"rope_type": "default", **(rope_scaling(m) or {}), "rope_theta": m.rotary_base},
                   intermediate_size=m.moe_ffn_hidden_size, num_local_experts=m.num_experts,
                   num_experts_per_tok=m.moe_router_topk, router_aux_loss_coef=m.moe_aux_loss_coeff,
                   output_router_logits=False, attention_bias=True, swiglu_alpha=1.702,
                   swiglu_limit=m.activation_func_clamp_value, sliding_window=m.sliding_window)
        return out

    def model_config(self, hf):
        m = LlamaLike.model_config(self, hf)
        require(hf, "swiglu_alpha", (1.702,), 1.702)  # megalm's quick GeGLU, as Megatron's
        require(hf, "attention_bias", (True,), True)
        m.add_bias_linear, m.softmax_type, m.attention_backend = True, "learnable", "unfused"
        m.quick_geglu, m.glu_linear_offset = True, 1.0
        m.activation_func_clamp_value = float(hf["swiglu_limit"]) if hf.get("swiglu_limit") is not None else None
        m.num_experts, m.moe_router_topk = hf["num_local_experts"], hf["num_experts_per_tok"]
        m.moe_ffn_hidden_size = m.ffn_hidden_size
        m.moe_aux_loss_coeff = float(hf.get("router_aux_loss_coef", 0.0))
        return m

    def window(self, hf, layers):
        """GPT-OSS reads ``layer_types`` whatever ``use_sliding_window`` (which it lacks) says."""
        return LlamaLike.window(self, dict(hf, use_sliding_window=True), layers)

    def renames(self, m):
        out = super().renames(m)
        for i in range(m.num_layers):
            out.append(Rename(f"layers.{i}.attention.sinks", f"model.layers.{i}.self_attn.sinks"))
        return out

    def moe_renames(self, m, ours, theirs):
        e, t = ours + "mlp.", theirs + "mlp."
        return [Rename(e + "router.weight", t + "router.weight"), Rename(e + "router.bias", t + "router.bias"),
                Interleaved((e + "experts.w1", e + "experts.w3"), t + "experts.gate_up_proj"),
                Interleaved((e + "experts.b1", e + "experts.b3"), t + "experts.gate_up_proj_bias"),
                Rename(e + "experts.w2", t + "experts.down_proj"),
                Rename(e + "experts.b2", t + "experts.down_proj_bias")]

