"""DeepSeek-V3 (and Kimi K2, which shares its architecture): GLM-4.5's router, shared expert, first dense layers and
multi-token prediction layers, with multi-latent attention instead of grouped-query heads. The rotated rows of
DeepSeek's query and key projections are in interleaved pairs (``rope_interleave``, true in every released
checkpoint); megalm rotates halves, so those rows are reordered both ways (``RopeRows``)."""
from __future__ import annotations

from megalm.interop.families.base import ConversionError, Rename, RopeRows, require
from megalm.interop.families.moe import Glm4MoE


class DeepseekV3(Glm4MoE):
    model_type, architecture = "deepseek_v3", "DeepseekV3ForCausalLM"
    adds_keys = frozenset({"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                           "qk_head_dim", "rope_interleave", "num_mtp_layers"})
    mla = True

    def check(self, m):
        super().check(m)
        if m.qk_layernorm or m.add_qkv_bias:
            raise ConversionError(f"{self.architecture} needs no QK norms and no q/k/v biases")

    def hf_config(self, m, vocab, eod, dtype):
        out = super().hf_config(m, vocab, eod, dtype)
        out["rope_parameters"].pop("partial_rotary_factor")
        out.pop("use_qk_norm")
        out.update(architectures=[self.architecture], model_type=self.model_type, attention_bias=False,
                   head_dim=m.qk_pos_emb_head_dim, qk_head_dim=m.query_head_dim, q_lora_rank=m.q_lora_rank,
                   kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_head_dim,
                   qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim, rope_interleave=True)
        return out

    def model_config(self, hf):
        require(hf, "rope_interleave", (True,), True)
        require(hf, "attention_bias", (False,), False)
        m = super().model_config(hf)
        heads = m.num_attention_heads
        if hf.get("num_key_value_heads") not in (None, heads):
            raise ConversionError(f"config.json: num_key_value_heads={hf['num_key_value_heads']} with "
                                  f"num_attention_heads={heads}: multi-latent attention gives every head its own "
                                  f"key and value (megalm implements num_key_value_heads = num_attention_heads)")
        m.multi_latent_attention, m.num_query_groups, m.kv_channels = True, heads, None
        m.q_lora_rank, m.kv_lora_rank = hf.get("q_lora_rank"), hf["kv_lora_rank"]
        m.qk_head_dim, m.qk_pos_emb_head_dim = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
        m.v_head_dim = hf["v_head_dim"]
        if hf.get("qk_head_dim") not in (None, m.query_head_dim):
            raise ConversionError(f"config.json: qk_head_dim={hf['qk_head_dim']} is not qk_nope_head_dim + "
                                  f"qk_rope_head_dim = {m.query_head_dim}")
        return m

    def attention_renames(self, m, a, h):
        a, h = a + "attention.", h + "self_attn."
        heads, rot = m.num_attention_heads, m.qk_pos_emb_head_dim
        out = [RopeRows(a + "wkv_a.weight", h + "kv_a_proj_with_mqa.weight", 1, m.kv_lora_rank, rot),
               Rename(a + "kv_a_norm.weight", h + "kv_a_layernorm.weight"),
               Rename(a + "wkv_b.weight", h + "kv_b_proj.weight")]
        if m.q_lora_rank is None:
            return out + [RopeRows(a + "wq.weight", h + "q_proj.weight", heads, m.qk_head_dim, rot)]
        return out + [Rename(a + "wq_a.weight", h + "q_a_proj.weight"),
                      Rename(a + "q_a_norm.weight", h + "q_a_layernorm.weight"),
                      RopeRows(a + "wq_b.weight", h + "q_b_proj.weight", heads, m.qk_head_dim, rot)]
