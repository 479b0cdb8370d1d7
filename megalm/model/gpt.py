"""The GPT decoder: embeddings, blocks, final norm, output layer and loss.

GPT-2 flavour: learned positions, LayerNorm, GELU, tied output. Llama flavour: RoPE, RMSNorm, SwiGLU,
grouped-query attention, untied output, no biases. Both come from ``ModelConfig`` alone.

Under pipeline parallelism one ``GPT`` holds one stage's layers, in one or more chunks (virtual stages); the
embedding lives on the first stage, the final norm, output layer and loss on the last, with the multi-token
prediction modules (``megalm.model.mtp``) and, for them or a tied output layer, a copy of the embedding. Parameters keep their
global names (``layers.7...``) on every layout, which is what checkpoints key on.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.data.tokenizers import padded_vocab_size
from megalm.model.moe import MoEStats
from megalm.model.mtp import MTPModule
from megalm.model.recompute import recomputed
from megalm.model.rope import rope_tables
from megalm.model.transformer import Block, KVCache, Norm, hidden_dropout
from megalm.parallel.context import attention_mask
from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.layers import (ColumnParallelLinear, VocabParallelEmbedding, enter_tp_region, full_shape,
                                    init_shard_, param_generator)
from megalm.parallel.mappings import gather_from_tp, scatter_to_sequence_parallel
from megalm.parallel.random import RNGTracker, rank_seed
from megalm.parallel.state import Topology


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, topo: Optional[Topology] = None,
                 chunks: Optional[list] = None):
        """``chunks``: the global layer indices of each of this rank's pipeline chunks (default: all layers)."""
        super().__init__()
        topo = topo or Topology()
        self.cfg, self.topo, self.vocab_size = cfg, topo, vocab_size
        self.chunks = chunks or [list(range(cfg.num_layers))]
        self.padded_vocab_size = padded_vocab_size(vocab_size, cfg.make_vocab_size_divisible_by, topo.tp)
        self.vocab_start = topo.tp_rank * (self.padded_vocab_size // topo.tp)  # first logit column of this rank
        tied, mtp = not cfg.untie_embeddings_and_output_weights, bool(cfg.mtp_num_layers)
        if topo.is_first_stage or ((tied or mtp) and topo.is_last_stage):  # multi-token prediction embeds too
            self.embedding = VocabParallelEmbedding(self.padded_vocab_size, cfg.hidden_size, topo)
        if topo.is_first_stage and cfg.position_embedding_type == "learned_absolute":
            self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.rng_tracker = RNGTracker(tp_rank=topo.tp_rank)
        self.moe_stats = MoEStats() if cfg.num_experts else None  # what MoE layers report to the trainer
        moe = cfg.moe_layers()
        self.layers = nn.ModuleDict({str(i): Block(cfg, topo, str(i), self.rng_tracker,
                                                   self.moe_stats if moe[i] else None)
                                     for chunk in self.chunks for i in chunk})
        if topo.is_last_stage:
            self.final_norm = Norm(cfg.hidden_size, cfg.normalization, cfg.norm_epsilon, topo.sequence_parallel)
            if not tied:
                self.output = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab_size, topo, bias=False)
            if mtp:
                self.mtp = nn.ModuleDict({str(k): MTPModule(cfg, topo, k, self.rng_tracker, self.moe_stats)
                                          for k in range(cfg.mtp_num_layers)})
        for p in self.parameters():  # rows past the real vocabulary are padding: zero, never trained or saved
            p.padded_rows = False
            p.tied_copy = False
            p.shared_embedding = False
        for name in ("embedding", "output"):
            if hasattr(self, name):
                getattr(self, name).weight.padded_rows = True
        if (tied or mtp) and topo.is_last_stage and not topo.is_first_stage:
            # the last stage's copy of the embedding: kept equal to the first stage's by summing their gradients
            # over the embedding group; saved and counted once (by the first stage)
            self.embedding.weight.tied_copy = True
        if (tied or mtp) and topo.pp > 1 and hasattr(self, "embedding"):
            self.embedding.weight.shared_embedding = True

    @torch.no_grad()
    def init_weights(self, seed: int, device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32) -> None:
        """Normal(0, std) weights, std / sqrt(2 L) for the projections that write into the residual stream,
        norms at one, biases at zero; each tensor drawn whole from a generator keyed by its name.
        Also seeds this rank's dropout generator.

        A model built on the meta device gets its parameters here, one at a time, on ``device`` in ``dtype``
        (state that is not trained, the MoE expert bias, stays fp32): no copy of the stage is ever made, and the
        only temporary is the whole tensor a shard is cut from, drawn in fp32 on ``device``."""
        self.rng_tracker.seed(rank_seed(seed, self.topo), self.topo.tp_rank)
        std = self.cfg.init_method_std
        for module in self.modules():
            for leaf, p in list(module._parameters.items()):
                if p is not None and p.is_meta:
                    real = nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype if p.requires_grad
                                                    else torch.float32), requires_grad=p.requires_grad)
                    real.__dict__.update(p.__dict__)  # tp_dim, expert, padded_rows, ...
                    module._parameters[leaf] = real
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if getattr(p, "lora", False):  # LoRA: B zero (the adapted model starts as the base), A as PEFT's
                if leaf == "b":
                    p.zero_()
                else:
                    init_shard_(p, full_shape(p, self.topo), 0.0, param_generator(seed, name, p.device), self.topo,
                                bound=p.fan_in ** -0.5)
            elif "norm" in name:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf in ("bias", "expert_bias", "sinks", "b1", "b3", "b2"):
                p.zero_()
            else:
                scaled = name.endswith(("attention.wo.weight", ".w2.weight", "experts.w2"))
                rows = self.vocab_size if p.padded_rows else None
                init_shard_(p, full_shape(p, self.topo), std / math.sqrt(2 * self.cfg.num_layers) if scaled else std,
                            param_generator(seed, name, p.device), self.topo, valid_rows=rows)

    def is_first_chunk(self, chunk: int) -> bool:
        """Whether ``chunk`` is the first virtual stage of the whole pipeline (it embeds the tokens)."""
        return chunk == 0 and self.topo.is_first_stage

    def is_last_chunk(self, chunk: int) -> bool:
        """Whether ``chunk`` is the last virtual stage of the whole pipeline (it computes logits and loss)."""
        return chunk == len(self.chunks) - 1 and self.topo.is_last_stage

    def embed(self, tokens, position_ids):
        """Token (and learned position) embeddings, this rank's sequence shard under SP, with dropout."""
        x = self.embedding(tokens)
        if self.cfg.position_embedding_type == "learned_absolute":
            x = x + self.position_embedding(position_ids)
        if self.topo.sequence_parallel:
            x = scatter_to_sequence_parallel(x, self.topo.tp_group)
        return hidden_dropout(x, self.cfg.hidden_dropout, self.training, self.topo, self.rng_tracker)

    def attention_inputs(self, tokens, position_ids, kv_cache: Optional[KVCache] = None, document_ids=None):
        """(positions, RoPE tables or None, attention mask or None) of a micro-batch: what every layer shares."""
        start = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        rope = rope_tables(self.cfg, position_ids) if self.cfg.position_embedding_type == "rope" else None
        mask = None
        if self.topo.cp > 1 and kv_cache is None:  # this rank's chunks of the sequence against all of it
            mask = {kind: attention_mask(kind, tokens.shape[1], self.topo, document_ids, tokens.device)
                    for kind in dict.fromkeys(self.topo.cp_comm_types)}  # one per kind the layers use
        elif document_ids is not None:  # causal within each packed document
            same = document_ids[:, :, None] == document_ids[:, None, :]
            mask = (same & torch.ones_like(same[0]).tril())[:, None]
        return position_ids, rope, mask

    def hidden_states(self, tokens, position_ids=None, kv_cache: Optional[KVCache] = None, hidden=None,
                      chunk: int = 0, document_ids=None, inputs=None):
        """Run one chunk: the embedding first on the first stage (else start from the received ``hidden``),
        the chunk's layers, and the final norm on the last stage. ``inputs``: ``attention_inputs``' result, when
        the caller has it."""
        position_ids, rope, mask = inputs or self.attention_inputs(tokens, position_ids, kv_cache, document_ids)
        x = self.embed(tokens, position_ids) if self.is_first_chunk(chunk) else hidden
        blocks = [self.layers[str(i)] for i in self.chunks[chunk]]
        if self.cfg.recompute_granularity == "full" and self.training and kv_cache is None:
            x = self._run_recomputed(blocks, x, rope, mask)
        else:
            for block in blocks:
                x = block(x, rope, kv_cache, mask)
        if kv_cache is not None and chunk == len(self.chunks) - 1:  # this rank's layers all hold the new keys
            kv_cache.length += tokens.shape[1]
        if not self.is_last_chunk(chunk):
            return x
        return self.final_norm(x)

    def _run_recomputed(self, blocks, x, rope, mask=None):
        """Full recomputation: groups of ``recompute_num_layers`` layers (uniform), or only the first that many
        layers one by one (block), keep just their inputs; the rest run normally."""
        n = self.cfg.recompute_num_layers

        def run(h, *group):
            for block in group:
                h = block(h, rope, None, mask)
            return h

        if self.cfg.recompute_method == "uniform":
            for i in range(0, len(blocks), n):
                x = recomputed(lambda h, g=blocks[i:i + n]: run(h, *g), self.rng_tracker, x)
            return x
        for i, block in enumerate(blocks):
            x = recomputed(lambda h, b=block: run(h, b), self.rng_tracker, x) if i < n else block(x, rope, None, mask)
        return x

    def logits_shard(self, h):
        """This rank's slice of the (padded) vocabulary logits."""
        if self.cfg.untie_embeddings_and_output_weights:
            return self.output(h)
        return F.linear(enter_tp_region(h, self.topo), self.embedding.weight)

    def forward(self, tokens, labels=None, position_ids=None, kv_cache: Optional[KVCache] = None, hidden=None,
                chunk: int = 0, document_ids=None, mtp_tokens=None, mtp_labels=None):
        """Per-token loss ``[b, s]`` when ``labels`` are given, else full logits ``[b, s, vocab]``; before the
        last pipeline stage, the hidden states to send on. With multi-token prediction and its shifted
        ``mtp_tokens`` / ``mtp_labels`` (``[D, b, s]``, ``megalm.model.mtp.shifted_targets``): (the loss, each
        depth's per-token loss ``[D, b, s]``)."""
        inputs = self.attention_inputs(tokens, position_ids, kv_cache, document_ids)
        h = self.hidden_states(tokens, position_ids, kv_cache, hidden, chunk, document_ids, inputs)
        if not self.is_last_chunk(chunk):
            return h
        logits = self.logits_shard(h)
        if labels is None:
            return gather_from_tp(logits, self.topo.tp_group)[..., : self.vocab_size]
        loss = vocab_parallel_cross_entropy(logits, labels, self.vocab_start, self.vocab_size, self.topo.tp_group)
        if mtp_tokens is None or not hasattr(self, "mtp"):
            return loss
        depths = []
        for k, module in enumerate(self.mtp.values()):
            h = module(h, self.embed(mtp_tokens[k], inputs[0]), inputs[1], inputs[2])
            depths.append(vocab_parallel_cross_entropy(self.logits_shard(h), mtp_labels[k], self.vocab_start,
                                                       self.vocab_size, self.topo.tp_group))
        return loss, torch.stack(depths)

    def matmul_parameters(self) -> tuple:
        """(transformer-layer parameters, output-layer parameters) of this stage's layers, unsharded over TP
        and EP, counting of each MoE layer's routed experts only the top-k a token uses (active parameters):
        what the FLOP count uses (summed over stages by the caller). The expert bias is state, not counted.
        Multi-token prediction's modules count as layers, and each runs the output layer once more."""
        active = self.cfg.moe_router_topk / self.cfg.num_experts if self.cfg.num_experts else 1.0
        params = list(self.layers.parameters()) + (list(self.mtp.parameters()) if hasattr(self, "mtp") else [])
        layers = sum(math.prod(full_shape(p, self.topo)) * (active if getattr(p, "expert", False) else 1.0)
                     for p in params if p.requires_grad)
        outputs = 1 + (self.cfg.mtp_num_layers or 0)
        return round(layers), outputs * self.vocab_size * self.cfg.hidden_size if self.topo.is_last_stage else 0

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of this stage, unsharded over TP, padding and tied copies excluded."""
        total = 0
        for name, p in self.named_parameters():
            if p.tied_copy:
                continue
            n = math.prod(full_shape(p, self.topo))
            if p.padded_rows:
                if exclude_embeddings:
                    continue
                n = n // self.padded_vocab_size * self.vocab_size
            if name == "position_embedding.weight" and exclude_embeddings:
                continue
            total += n
        return total
