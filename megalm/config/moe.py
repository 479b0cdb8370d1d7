"""Mixture-of-experts options of the model section (Megatron's flag names) and the rules among them; how experts
are laid out over ranks is checked in ``layout.py``.

``ModelConfig`` inherits these fields, so they live in the ``model`` section of YAML files and checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from megalm.config.fields import ConfigError, opt, parse_layer_pattern


@dataclass
class MoEOptions:
    num_experts: Optional[int] = opt(None, "routed experts per MoE layer (default: a dense model)")
    moe_router_topk: int = opt(2, "experts each token is routed to")
    moe_ffn_hidden_size: Optional[int] = opt(None, "width of each routed expert (default --ffn-hidden-size)")
    moe_layer_freq: str = opt("1", "which layers are MoE: every N-th (an integer N) or one 0/1 per layer, "
                              "e.g. '[0,1,1,1]' or '0 1 1 1'")
    moe_shared_expert_intermediate_size: Optional[int] = opt(None, "width of a shared expert (a dense MLP every "
                                                             "token goes through beside the routed ones)")
    moe_router_score_function: str = opt("softmax", "router scores", choices=("softmax", "sigmoid"))
    moe_router_pre_softmax: bool = opt(False, "softmax over all experts before the top-k (the chosen weights are "
                                       "not renormalised); default: top-k of the logits, softmax over those")
    moe_router_num_groups: Optional[int] = opt(None, "group-limited routing: experts split into this many groups")
    moe_router_group_topk: Optional[int] = opt(None, "group-limited routing: groups each token may use")
    moe_router_topk_scaling_factor: Optional[float] = opt(None, "multiply the chosen experts' weights by this "
                                                          "(DeepSeek-V3's and GLM-4.5's routed_scaling_factor)")
    moe_router_load_balancing_type: str = opt("aux_loss", "load-balancing loss over each micro-batch (aux_loss) "
                                              "or each sequence (seq_aux_loss)",
                                              choices=("aux_loss", "seq_aux_loss", "none"))
    moe_aux_loss_coeff: float = opt(0.0, "weight of the load-balancing loss")
    moe_z_loss_coeff: Optional[float] = opt(None, "weight of the router z-loss (mean squared log-sum-exp)")
    moe_router_enable_expert_bias: bool = opt(False, "aux-loss-free balancing: a per-expert bias added to the "
                                              "scores for selection only, updated once per step")
    moe_router_bias_update_rate: float = opt(1e-3, "step of the expert-bias update (sign of the load error)")
    moe_expert_capacity_factor: Optional[float] = opt(None, "token dropping: each expert takes at most factor x "
                                                      "tokens x top-k / experts of the tokens its router saw "
                                                      "(default: dropless)")
    moe_token_drop_policy: str = opt("probs", "which tokens an over-full expert drops: lowest probability "
                                     "(probs) or latest in the sequence (position)", choices=("probs", "position"))
    moe_token_dispatcher_type: str = opt("alltoall", "how tokens reach their experts' ranks under expert "
                                         "parallelism", choices=("alltoall", "allgather"))
    moe_pad_expert_input_to_capacity: bool = opt(False, "with a capacity factor: pad every expert's input to its "
                                                 "capacity, so expert matmuls have fixed shapes (same numbers)")
    moe_grouped_gemm: bool = opt(True, "experts as one grouped matmul over tokens sorted by expert (the per-expert "
                                 "loop is the reference)", flag="--moe-per-expert-loop", negate=True)

    def moe_layers(self) -> List[bool]:
        """For each layer, whether it is an MoE layer."""
        if not self.num_experts:
            return [False] * self.num_layers
        return parse_layer_freq(self.moe_layer_freq, self.num_layers)


def parse_layer_freq(text: str, num_layers: int) -> List[bool]:
    """Megatron's ``--moe-layer-freq``: every N-th layer from the first, or a 0/1 list."""
    return parse_layer_pattern(text, num_layers, "--moe-layer-freq", lambda i, n: i % n == 0)


def validate_moe(m) -> None:
    """MoE rules of the model alone, checked before any work; fills --moe-ffn-hidden-size's default."""
    if not m.num_experts:
        return
    if m.moe_ffn_hidden_size is None:
        m.moe_ffn_hidden_size = m.ffn_hidden_size
    m.moe_layers()  # parses --moe-layer-freq
    if m.num_experts < 1:
        raise ConfigError("--num-experts, --expert-model-parallel-size and --expert-tensor-parallel-size must be "
                          "at least 1")
    if not 1 <= m.moe_router_topk <= m.num_experts:
        raise ConfigError(f"--moe-router-topk {m.moe_router_topk} must be between 1 and --num-experts "
                          f"{m.num_experts}")
    groups, group_topk = m.moe_router_num_groups, m.moe_router_group_topk
    if (groups is None) != (group_topk is None):
        raise ConfigError("--moe-router-num-groups and --moe-router-group-topk go together")
    if groups is not None:
        if groups < 1 or m.num_experts % groups or not 1 <= group_topk <= groups:
            raise ConfigError(f"--moe-router-num-groups {groups} must divide --num-experts {m.num_experts}, and "
                              f"--moe-router-group-topk {group_topk} be between 1 and it")
        if m.moe_router_topk > group_topk * (m.num_experts // groups):
            raise ConfigError(f"--moe-router-topk {m.moe_router_topk} is more than the experts of "
                              f"--moe-router-group-topk {group_topk} groups")
    if m.moe_router_topk_scaling_factor is not None and not m.moe_router_topk_scaling_factor > 0:
        raise ConfigError(f"--moe-router-topk-scaling-factor must be positive, got {m.moe_router_topk_scaling_factor}")
    if m.moe_expert_capacity_factor is not None and m.moe_expert_capacity_factor <= 0:
        raise ConfigError(f"--moe-expert-capacity-factor must be positive, got {m.moe_expert_capacity_factor}")
    if m.moe_pad_expert_input_to_capacity and m.moe_expert_capacity_factor is None:
        raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
    if m.moe_aux_loss_coeff < 0 or (m.moe_z_loss_coeff or 0) < 0 or m.moe_router_bias_update_rate < 0:
        raise ConfigError("--moe-aux-loss-coeff, --moe-z-loss-coeff and --moe-router-bias-update-rate must be >= 0")
    for size, flag in ((m.moe_ffn_hidden_size, "--moe-ffn-hidden-size"),
                       (m.moe_shared_expert_intermediate_size, "--moe-shared-expert-intermediate-size")):
        if size is not None and size < 1:
            raise ConfigError(f"{flag} must be at least 1, got {size}")
