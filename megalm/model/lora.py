"""LoRA on the GPT: adapters beside the projections ``--lora-target-modules`` names (attention's, the MLP's, the
experts'), the rest of the model frozen; adapters switched off (the base model, DPO's reference) and merged into
the weights (export). The adapters themselves, split as their layers are, are ``megalm.parallel.lora``."""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch
import torch.nn as nn

from megalm.config import LORA_TARGETS, ConfigError, ModelConfig, PostTrainConfig
from megalm.model.attention import Attention
from megalm.model.moe import GroupedExperts
from megalm.model.transformer import MLP
from megalm.parallel.lora import LoRA, ExpertLoRA
from megalm.parallel.state import Topology


def projections(m: ModelConfig) -> Dict[str, tuple]:
    """The projections a model of this config has, by owner: attention's and the MLPs' (experts' alike)."""
    if m.multi_latent_attention:
        attention = (("wq_a", "wq_b") if m.q_lora_rank else ("wq",)) + ("wkv_a", "wkv_b", "wo")
    else:
        attention = ("wq", "wk", "wv", "wo")
    return {"attention": attention, "mlp": ("w1", "w3", "w2") if m.swiglu else ("w1", "w2")}


def target_attributes(m: ModelConfig, names: List[str]) -> set:
    """megalm's projections named by ``--lora-target-modules``; a name that matches none of this model's is an
    error that names it (decided from the config, so every pipeline stage agrees)."""
    have = {a for attrs in projections(m).values() for a in attrs}
    out = set()
    for name in names:
        mine = set(LORA_TARGETS[name]) & have
        if not mine:
            raise ConfigError(f"--lora-target-modules {name}: this model has no such projection (it has "
                              f"{', '.join(n for n, attrs in LORA_TARGETS.items() if set(attrs) & have)})")
        out |= mine
    return out


def apply_lora(model: nn.Module, cfg: PostTrainConfig, topo: Topology) -> int:
    """Add adapters beside the targeted projections of every block on this stage (before ``init_weights``: on the
    meta device like the rest); returns how many."""
    m = model.cfg
    wanted, count = target_attributes(m, cfg.lora_target_modules), 0
    r, alpha, dropout = cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout
    for module in list(model.modules()):
        if isinstance(module, GroupedExperts):
            if topo.etp > 1:
                raise ConfigError("--lora-rank on experts with --expert-tensor-parallel-size > 1 is not supported: "
                                  "use ETP 1, or leave the MLP's projections out of --lora-target-modules")
            stacks = {n: getattr(module, n) for n in ("w1", "w3", "w2") if hasattr(module, n) and n in wanted}
            if stacks:
                module.lora = nn.ModuleDict({n: ExpertLoRA(w.shape[0], w.shape[1], w.shape[2], r, alpha, dropout)
                                             for n, w in stacks.items()})
                count += len(stacks)
            continue
        if not isinstance(module, (Attention, MLP)):
            continue
        for attr in projections(m)["attention" if isinstance(module, Attention) else "mlp"]:
            layer = getattr(module, attr, None)
            if attr in wanted and layer is not None:
                layer.lora = LoRA(layer.in_features, layer.out_features, r, alpha, dropout, layer.split, topo,
                                  model.rng_tracker, getattr(layer.weight, "sequence_parallel", False))
                count += 1
    return count


def freeze_base(model: nn.Module) -> int:
    """Only the adapters train: every other parameter stops asking for gradients (so no gradient buffer or
    optimizer state is made for it). Returns the adapters' parameter count on this rank."""
    n = 0
    for p in model.parameters():
        if getattr(p, "lora", False):
            n += p.numel()
        elif p.requires_grad:  # a weight of the base (not state the model never trained, as MoE expert biases)
            p.requires_grad_(False)
            p.lora_base = True
    return n


def has_adapters(model: nn.Module) -> bool:
    return any(getattr(p, "lora", False) for p in model.parameters())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model: every adapter skipped inside the block (DPO's reference without a second model)."""
    adapters = [m for m in model.modules() if isinstance(m, (LoRA, ExpertLoRA))]
    for a in adapters:
        a.enabled = False
    try:
        yield
    finally:
        for a in adapters:
            a.enabled = True


def adapter_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """What an adapter adds to its layer's whole weight: ``scale B A`` in ``[out, in]`` (dense), or for an expert
    stack ``[E, in, out]`` ``scale A B``; in fp32."""
    a, b = a.float(), b.float()
    return scale * (a @ b if a.dim() == 3 else b @ a)


def merge_adapters(state: dict, alpha: float, rank: int) -> dict:
    """Whole-tensor weights with every adapter (``X.lora.a``/``.b``, ``X.lora.wN.a``/``.b``) added into its
    weight (``X.weight``, ``X.wN``), in the weight's dtype; the adapter tensors dropped."""
    out = {k: v for k, v in state.items() if ".lora." not in k}
    for name in state:
        if not name.endswith(".a") or ".lora." not in name:
            continue
        base, tail = name.split(".lora.", 1)
        weight = f"{base}.weight" if tail == "a" else f"{base}.{tail[:-2]}"
        merged = out[weight].float() + adapter_delta(state[name], state[name[:-1] + "b"], alpha / rank)
        out[weight] = merged.to(out[weight].dtype)
    return out
