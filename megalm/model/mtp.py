"""Multi-token prediction (DeepSeek-V3; Megatron's ``--mtp-num-layers``): D modules after the main stack, module k
predicting the token k places past the one the main stack predicts.

Module k takes the hidden state of each position i (the main stack's output after its final norm for k = 1, else
module k - 1's), and the embedding of token i + k; it normalises both, projects [embedding; hidden] from twice the
width to the width, runs one transformer layer shaped like the main stack's last (MoE when that one is) and its own
final norm. The shared output layer turns the result into logits for token i + k + 1. Megatron's order and
semantics throughout: ``eh_proj`` column parallel, then gathered (and under SP scattered again).

The shifted tokens, labels and loss masks are cut from whole sequences before context parallelism splits them
(``shifted_targets``), so every layout sees the same targets. The modules live on the last pipeline stage, which
then also holds the embedding, kept equal to the first stage's as a tied output layer's copy is.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megalm.config import ModelConfig
from megalm.model.transformer import Block, Norm
from megalm.parallel.layers import ColumnParallelLinear
from megalm.parallel.mappings import gather_from_tp, scatter_to_sequence_parallel
from megalm.parallel.random import RNGTracker
from megalm.parallel.state import Topology


def shifted_targets(batch: dict, depth: int, pad: int = 0) -> dict:
    """The micro-batch with each depth's input tokens, labels and loss masks, ``[depth, b, s]``: depth k's are
    the batch's shifted k places to the left; where that runs past the sequence (or, with packed documents, into
    another document) the loss mask is 0 and the token ``pad``."""
    tokens, labels, mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    docs = batch.get("document_ids")
    s = tokens.shape[1]
    out = {"mtp_tokens": [], "mtp_labels": [], "mtp_loss_mask": []}
    for k in range(1, depth + 1):
        def shift(x, fill):
            return torch.cat((x[:, k:], x.new_full((x.shape[0], min(k, s)), fill)), dim=1)[:, :s]

        keep = shift(mask, 0)
        if docs is not None:
            keep = keep * (shift(docs, -1) == docs).to(keep.dtype)
        out["mtp_tokens"].append(shift(tokens, pad))
        out["mtp_labels"].append(shift(labels, pad))
        out["mtp_loss_mask"].append(keep)
    return dict(batch, **{key: torch.stack(parts) for key, parts in out.items()})


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, topo: Topology, depth: int, rng: RNGTracker, moe_stats=None):
        """``depth``: 0 for the first module; its layer is named after the main stack's (``num_layers + depth``)."""
        super().__init__()
        sp, h = topo.sequence_parallel, cfg.hidden_size
        self.topo = topo
        self.enorm = Norm(h, cfg.normalization, cfg.norm_epsilon, sp)
        self.hnorm = Norm(h, cfg.normalization, cfg.norm_epsilon, sp)
        self.eh_proj = ColumnParallelLinear(2 * h, h, topo, bias=False)
        self.layer = Block(cfg, topo, str(cfg.num_layers + depth), rng,
                           moe_stats if cfg.moe_layers()[-1] else None)
        self.final_norm = Norm(h, cfg.normalization, cfg.norm_epsilon, sp)

    def forward(self, hidden, embedded, rope=None, mask=None):
        """``hidden``: the previous depth's normalised output; ``embedded``: the shifted tokens' embedding (both
        this rank's sequence shard under SP)."""
        x = gather_from_tp(self.eh_proj(torch.cat((self.enorm(embedded), self.hnorm(hidden)), dim=-1)),
                           self.topo.tp_group)
        if self.topo.sequence_parallel:
            x = scatter_to_sequence_parallel(x, self.topo.tp_group)
        return self.final_norm(self.layer(x, rope, None, mask))
