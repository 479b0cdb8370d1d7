"""Multi-latent attention (DeepSeek-V2/V3, Kimi K2; Megatron's ``--multi-latent-attention``).

Queries come up from a normalised latent of ``--q-lora-rank`` (or straight from the input); keys and values from
one normalised latent of ``--kv-lora-rank``, plus a rotated key part of ``--qk-pos-emb-head-dim`` that every head
shares. A head's query and key are [``--qk-head-dim`` dims RoPE leaves alone; the rotated dims]; its value has
``--v-head-dim``, its own width.

Tensor parallelism splits the heads: the up-projections are column parallel; the down-projections are replicated
and applied to the block's input as it comes (under SP this rank's shard), so only the latents are gathered, as
in Megatron. Context parallelism sees ordinary heads whose keys and values differ in width.

Generation caches the latent and the rotated shared key, ``kv_lora_rank + qk_pos_emb_head_dim`` numbers per token
and layer whatever the heads, and attends in latent space: the key up-projection is folded into the queries and
the value up-projection applied after the weighted sum, so no head is ever expanded from the cache.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megalm.config import ModelConfig
from megalm.model.rope import apply_rope, yarn_softmax_factor
from megalm.model.attention import Attention, KVCache
from megalm.model.norm import Norm
from megalm.parallel.layers import ColumnParallelLinear, ReplicatedLinear, enter_tp_region
from megalm.parallel.state import Topology


class MultiLatentAttention(Attention):
    def projections(self, cfg: ModelConfig, topo: Topology) -> None:
        heads, sp = cfg.num_attention_heads, topo.sequence_parallel
        if cfg.q_lora_rank:
            self.wq_a = ReplicatedLinear(cfg.hidden_size, cfg.q_lora_rank, topo)
            self.q_a_norm = Norm(cfg.q_lora_rank, cfg.normalization, cfg.norm_epsilon, sp)
            self.wq_b = ColumnParallelLinear(cfg.q_lora_rank, heads * cfg.query_head_dim, topo, False,
                                             input_entered=True)
        else:
            self.wq = ColumnParallelLinear(cfg.hidden_size, heads * cfg.query_head_dim, topo, False,
                                           input_entered=True)
        self.wkv_a = ReplicatedLinear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim, topo)
        self.kv_a_norm = Norm(cfg.kv_lora_rank, cfg.normalization, cfg.norm_epsilon, sp)
        self.wkv_b = ColumnParallelLinear(cfg.kv_lora_rank, heads * (cfg.qk_head_dim + cfg.v_head_dim), topo, False,
                                          input_entered=True)
        self.q_scale = yarn_softmax_factor(cfg)  # folded into the queries: every attention backend applies it

    def qkv(self, x, rope, kv_cache: Optional[KVCache]):
        c = self.cfg
        r, dr, dn = c.kv_lora_rank, c.qk_pos_emb_head_dim, c.qk_head_dim
        latent, k_pe = self.wkv_a(x).split([r, dr], dim=-1)
        kv = enter_tp_region(torch.cat((self.kv_a_norm(latent), k_pe), dim=-1), self.topo)  # [b, s, r + dr]
        if c.q_lora_rank:
            q = self.wq_b(enter_tp_region(self.q_a_norm(self.wq_a(x)), self.topo))
        else:
            q = self.wq(enter_tp_region(x, self.topo))
        b, s = q.shape[:2]
        q_nope, q_pe = q.view(b, s, self.n_heads, -1).transpose(1, 2).split([dn, dr], dim=-1)
        latent, k_pe = kv[:, None].split([r, dr], dim=-1)  # [b, 1, s, .]: one for every head
        if rope is not None:
            q_pe, k_pe = apply_rope(q_pe, *rope), apply_rope(k_pe, *rope)
        if kv_cache is not None:
            return self._latent_qkv(q_nope, q_pe, latent, k_pe, kv_cache)
        k_nope, v = self.wkv_b(kv[..., :r]).view(b, s, self.n_heads, -1).transpose(1, 2).split([dn, c.v_head_dim],
                                                                                               dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)
        return (q * self.q_scale if self.q_scale != 1.0 else q), k, v

    def _up(self) -> torch.Tensor:
        """The key/value up-projection per head: ``[heads, qk_head_dim + v_head_dim, kv_lora_rank]``."""
        return self.wkv_b.weight.view(self.n_heads, -1, self.cfg.kv_lora_rank)

    def _latent_qkv(self, q_nope, q_pe, latent, k_pe, kv_cache: KVCache):
        """Queries in latent space, against the cached latents (keys [latent; rotated key], values the latent):
        ``q_nope . (W_uk c) = (W_uk^T q_nope) . c``."""
        latent, k_pe = kv_cache.update(self.layer, latent, k_pe)
        q = torch.cat((torch.einsum("bhsd,hdr->bhsr", q_nope, self._up()[:, : self.cfg.qk_head_dim]), q_pe), dim=-1)
        # the backends scale scores by 1 / sqrt(q's width), now kv_lora_rank + pos; the model's is qk + pos
        q = q * (self.q_scale * math.sqrt(q.shape[-1] / self.cfg.query_head_dim))
        return q, torch.cat((latent, k_pe), dim=-1), latent

    def heads_out(self, out):
        """The weighted latents ``[b, heads, s, kv_lora_rank]`` through each head's value up-projection."""
        return torch.einsum("bhsr,hvr->bhsv", out, self._up()[:, self.cfg.qk_head_dim:])
