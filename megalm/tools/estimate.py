"""``megalm-estimate``: per-GPU memory and step time of a model and a TP / PP / DP / ZeRO layout, on paper.

Takes the same flags as ``megalm-pretrain`` plus ``--world-size``. Parameters are counted exactly by building
every pipeline stage on PyTorch's meta device (no memory, no compute), so they follow megalm's real layer shapes,
vocabulary padding and tied-embedding copies. Bytes per parameter follow megalm's optimizer: parameters in the
run's dtype (2 bytes under bf16/fp16, 4 in fp32), gradients in fp32 (a full buffer that ZeRO 1 reduce-scatters
in place; only this rank's slice at ZeRO 2; 2 bytes with --grad-reduce-in-bf16), and as optimizer state Adam's
two fp32 moments plus, for bf16/fp16 parameters, fp32 main parameters (1/DP of them at ZeRO 1 and 2): Megatron's
2 + 4 + 12/DP under ZeRO 1 in bf16.

Activations saved for backward per layer and micro-batch, in units of ``s b h`` elements (s sequence, b micro
batch, h hidden; ``r = query groups / heads``, ``f`` the MLP width, ``t`` TP), from the tensors megalm's layers
keep (measured with saved-tensor hooks; tests/test_estimate.py checks the formula against a measurement):

    norms, their outputs, residual inputs:  4 (LayerNorm) or 6 (RMSNorm), divided by t under sequence parallelism,
                                            plus 2 full copies for the gathered inputs of the column-parallel layers
    q, k, v, attention output:              (2 + 2 r) / t; with multi-latent attention, for a heads,
                                            a (3 d_qk + d_nope + 2 d_v + 2 d_rope) / h / t (the up-projections'
                                            outputs, which the split heads keep alive, q and k joined, the output,
                                            RoPE's halves) plus its latents (q_lora + kv_lora + d_rope) / h
    MLP:                                    2 f / h / t (GELU) or 4 f / h / t (SwiGLU)
    attention probabilities (fused/unfused): a s / h / t

Full recomputation keeps only each layer's input (1, or 1/t with SP) plus one layer's full set while it is
recomputed. Under bf16/fp16 activations take 2 bytes. The first pipeline stage holds
``min(P, m)`` micro-batches in flight with 1F1B (times ``1 + (P - 1) / (P V)`` interleaved); the last stage also
keeps the fp32 logits of one micro-batch for the loss (``s b V / t``), once more per multi-token prediction
module, and each module's layer (shaped like the last) with its normalised inputs (4 s b h). Step time is the
model FLOPs (``megalm.training.flops``: 6 N + 6 L s a (d_qk + d_v) per token, with recomputation's extra
forward, N counting the active top-k of E experts, L the MTP layers too) at an assumed fraction of the peak.

Context parallelism divides the activations by CP (the p2p and a2a figure); allgather also keeps the whole
sequence's keys and values (``2 r s b h / t``) and the fp32 form of its causal mask from the local queries to
every key that SDPA keeps (``s b (s / CP)``, bench/bench_cp.py measures it). The bytes each rank hands to torch.distributed for CP
attention per step are ``megalm.parallel.context.comm_bytes`` summed over its layers and micro-batches. Mixture of experts: each rank holds E / EP experts per MoE layer; their gradients and Adam state are sharded over
the expert-data-parallel ranks (TP x DP / EP) under ZeRO. An MoE layer's activations replace the MLP's with, per
token, ``k (2 + 4 f_e / h)`` (SwiGLU; ``k (2 + 2 f_e / h)`` GELU: the routed copies in and out and the expert
hidden states), divided by t under sequence parallelism, plus the router's ``2 E / h``. The all-to-all moves per
step ``4 L_moe B s k h (EP - 1) / EP`` elements, all GPUs together (B the global batch; dispatch and combine,
forward and backward, of the pairs whose expert is on another rank when routing is even; the pairs on the rank's
own experts stay off the network); each GPU sends its share of that, on average the total over the world size.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from megalm.config import Config, ConfigError, build_parser, data_parallel_size, load_config, num_micro_batches
from megalm.data.tokenizers import padded_vocab_size
from megalm.parallel.state import Topology
from megalm.pipeline.layout import stage_chunks


@dataclass
class StageMemory:
    stage: int
    parameters: int  # count on this rank (TP shard)
    expert_parameters: int  # of which experts (EP shard)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def stage_parameters(cfg: Config, vocab_size: int, pp_rank: int) -> tuple:
    """(parameters on one TP rank of stage ``pp_rank``, of which layer parameters), from a meta-device model."""
    from megalm.model.gpt import GPT

    p = cfg.parallel
    topo = Topology(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, pp_rank=pp_rank,
                    sequence_parallel=p.sequence_parallel and p.tensor_model_parallel_size > 1,
                    ep=p.expert_model_parallel_size, etp=p.expert_tensor_parallel_size)
    chunks = stage_chunks(cfg.model.num_layers, topo.pp, pp_rank, p.num_layers_per_virtual_pipeline_stage,
                          p.pipeline_stage_layers)
    with torch.device("meta"):
        model = GPT(cfg.model, vocab_size, topo, chunks)
    trained = [t for t in model.parameters() if t.requires_grad]
    total = sum(t.numel() for t in trained)
    experts = sum(t.numel() for t in trained if getattr(t, "expert", False))
    moe = cfg.model.moe_layers()
    return total, experts, [moe[i] for c in chunks for i in c]


def activation_units_per_layer(cfg: Config, moe: bool = False) -> float:
    """Saved activation elements per layer and micro-batch, in units of s b h (see the module docstring); ``moe``
    for an MoE layer."""
    m, p = cfg.model, cfg.parallel
    t = p.tensor_model_parallel_size
    sp = p.sequence_parallel and t > 1
    norms = 6.0 if m.normalization == "RMSNorm" else 4.0
    units = norms / t + (2.0 if t > 1 else 0.0) if sp else norms
    if m.multi_latent_attention:  # heads of their own widths, and the latents each TP rank holds whole
        heads, qk, pos, v = m.num_attention_heads, m.query_head_dim, m.qk_pos_emb_head_dim, m.value_head_dim
        units += heads * (3 * qk + m.qk_head_dim + 2 * v + 2 * pos) / m.hidden_size / t
        units += ((m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_pos_emb_head_dim) / m.hidden_size
    else:
        r = m.num_query_groups / m.num_attention_heads
        units += (2 + 2 * r) / t
    if moe:
        per_token = m.moe_router_topk * (2 + (4 if m.swiglu else 2) * m.moe_ffn_hidden_size / m.hidden_size)
        units += (per_token + 2 * m.num_experts / m.hidden_size) / (t if sp else 1)
        shared = m.moe_shared_expert_intermediate_size
        if shared:
            units += (4 if m.swiglu else 2) * shared / m.hidden_size / t
    else:
        units += (4 if m.swiglu else 2) * m.ffn_hidden_size / m.hidden_size / t
    if m.attention_backend != "sdpa":
        units += m.num_attention_heads * m.seq_length / m.hidden_size / t  # the softmax output
    return units


def estimate(cfg: Config, world_size: int, vocab_size: int) -> list:
    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = data_parallel_size(cfg, world_size)
    micro = num_micro_batches(cfg, world_size)
    virtual = m.num_layers // (pp * p.num_layers_per_virtual_pipeline_stage) if \
        p.num_layers_per_virtual_pipeline_stage else 1
    zero = o.zero_stage if dp * p.context_parallel_size > 1 else 0  # ZeRO shards over DP x CP
    mixed = t.bf16 or t.fp16
    cp = p.context_parallel_size  # each rank holds 1/CP of every sequence
    sbh = m.seq_length // cp * t.micro_batch_size * m.hidden_size
    width = 2 if mixed else 4
    dense_layer = activation_units_per_layer(cfg) * sbh * width
    moe_layer = activation_units_per_layer(cfg, True) * sbh * width if m.num_experts else 0
    sp = p.sequence_parallel and tp > 1
    edp = tp * cp * dp // (p.expert_model_parallel_size * p.expert_tensor_parallel_size)
    out = []
    for stage in range(pp):
        params, experts, moe = stage_parameters(cfg, vocab_size, stage)
        dense = params - experts
        param_bytes = width * params
        shards = [(dense, dp * cp), (experts, edp)]  # each part sharded over the ranks that reduce it
        if zero == 2:
            grad_bytes = sum(4 * math.ceil(n / ranks) for n, ranks in shards)
        else:
            grad_bytes = (2 if t.grad_reduce_in_bf16 else 4) * params
        per_param = 12 if mixed else 8  # fp32 main parameters next to Adam's moments
        optimizer_bytes = sum(per_param * (math.ceil(n / ranks) if zero >= 1 else n) for n, ranks in shards)
        layers = len(moe)
        if m.recompute_granularity == "full":
            kept = layers * sbh * 4 / (tp if sp else 1)
            acts = kept + max(moe_layer if any(moe) else 0, dense_layer)
        else:
            acts = sum(moe_layer if is_moe else dense_layer for is_moe in moe)
        in_flight = 1
        if pp > 1:
            in_flight = min(pp - stage, micro) if virtual == 1 else pp * (1 + (pp - 1) / (pp * virtual))
            in_flight = min(in_flight, micro * virtual) if virtual > 1 else in_flight
        acts *= in_flight
        if stage == pp - 1:  # the logits (each MTP module's too), and the MTP modules' layers and projections
            padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
            depth = m.mtp_num_layers or 0
            acts += (1 + depth) * 4 * m.seq_length // cp * t.micro_batch_size * padded / tp
            last = moe_layer if m.moe_layers()[-1] else dense_layer
            acts += depth * (last + 4 * sbh * width / (tp if sp else 1))
        if cp > 1:  # allgather layers also keep every key and value and their scores
            gathered = sum(_cp_kind(cfg, layer) == "allgather" for layer in _stage_layers(cfg, stage))
            r = m.num_query_groups / m.num_attention_heads
            acts += gathered * in_flight * t.micro_batch_size * m.seq_length * (
                2 * r * m.hidden_size * width / tp + m.seq_length // cp * 4)
        out.append(StageMemory(stage, params, experts, param_bytes, grad_bytes, optimizer_bytes, int(acts)))
    return out


def _cp_kind(cfg: Config, layer: int) -> str:
    kinds = cfg.parallel.cp_comm_type
    return kinds[layer if len(kinds) > 1 else 0]


def _stage_layers(cfg: Config, stage: int) -> list:
    from megalm.pipeline.layout import stage_chunks

    p = cfg.parallel
    chunks = stage_chunks(cfg.model.num_layers, p.pipeline_model_parallel_size, stage,
                          p.num_layers_per_virtual_pipeline_stage, p.pipeline_stage_layers)
    return [i for chunk in chunks for i in chunk]


def context_parallel_bytes(cfg: Config, world_size: int, stage: int = 0) -> float:
    """Bytes one rank of pipeline stage ``stage`` hands to torch.distributed for context-parallel attention per
    optimizer step (``megalm.parallel.context.comm_bytes``), without recomputation's repeated forwards."""
    from megalm.parallel.context import comm_bytes

    m, p, t = cfg.model, cfg.parallel, cfg.train
    cp, tp = p.context_parallel_size, p.tensor_model_parallel_size
    if cp == 1:
        return 0.0
    width = 2 if (t.bf16 or t.fp16) else 4
    per_micro = sum(comm_bytes(_cp_kind(cfg, layer), cp, t.micro_batch_size, m.seq_length,
                               m.num_attention_heads // tp, m.num_query_groups // tp, m.query_head_dim, width,
                               m.value_head_dim)
                    for layer in _stage_layers(cfg, stage))
    return per_micro * num_micro_batches(cfg, world_size)


def all_to_all_bytes(cfg: Config, world_size: int, mixed: bool = False) -> float:
    """Bytes the expert dispatch moves across ranks per optimizer step, all GPUs together (see the module
    docstring); 0 without expert parallelism."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    ep = p.expert_model_parallel_size
    if not m.num_experts or ep == 1:
        return 0.0
    tokens = t.global_batch_size * m.seq_length
    return 4 * sum(m.moe_layers()) * tokens * m.moe_router_topk * m.hidden_size * (ep - 1) / ep * (2 if mixed else 4)


def _whole_model(cfg: Config, vocab_size: int):
    from megalm.model.gpt import GPT

    with torch.device("meta"):
        return GPT(cfg.model, vocab_size)


def total_parameters(cfg: Config, vocab_size: int) -> int:
    """The whole model's parameters (unpadded vocabulary, tied copies once)."""
    return _whole_model(cfg, vocab_size).num_parameters()


def flops(cfg: Config, vocab_size: int) -> tuple:
    """(model FLOPs per token, FLOPs done per token with recomputation, matmul parameters a token uses)."""
    from megalm.training.flops import flops_per_token

    layers, output = _whole_model(cfg, vocab_size).matmul_parameters()
    return (*flops_per_token(cfg.model, layers, output), layers + output)


def step_seconds(cfg: Config, world_size: int, vocab_size: int, peak_tflops: float, mfu: float) -> float:
    """Seconds per optimizer step if every GPU ran the step's FLOPs (recomputation included) at ``mfu``."""
    done = flops(cfg, vocab_size)[1]
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    return done * tokens / (world_size * peak_tflops * 1e12 * mfu)


def _without_own_flags(argv: list, own: tuple) -> list:
    """``argv`` less the estimator's own flags and their values (``--flag value`` or ``--flag=value``): what is
    left goes to the trainer's parser."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in own:
            skip = True
        elif arg.split("=", 1)[0] not in own:
            rest.append(arg)
    return rest


def main(argv=None) -> int:
    parser = build_parser()
    parser.prog = "megalm-estimate"
    parser.description = "Per-GPU memory and step time of a model and parallel layout, without a GPU."
    parser.add_argument("--world-size", dest="world_size_", type=int, required=True, help="number of GPUs")
    parser.add_argument("--padded-vocab", dest="vocab_", type=int, default=None,
                        help="vocabulary size (default: from the tokenizer flags)")
    parser.add_argument("--assumed-mfu", dest="mfu_", type=float, default=0.45,
                        help="fraction of peak for the step-time estimate")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, _ = parser.parse_known_args(argv)
        world, vocab = args.world_size_, args.vocab_
        rest = _without_own_flags(argv, ("--world-size", "--padded-vocab", "--assumed-mfu"))
        if vocab is not None and "--tokenizer-type" not in rest:
            rest += ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab - 1)]
        cfg = load_config(rest, world_size=world)
        if vocab is None:
            from megalm.data.tokenizers import build_tokenizer

            vocab = build_tokenizer(cfg.data).vocab_size
    except ConfigError as exc:
        print(f"megalm-estimate: error: {exc}", file=sys.stderr)
        return 2
    stages = estimate(cfg, world, vocab)
    p = cfg.parallel
    gib = 1024 ** 3
    n = total_parameters(cfg, vocab)
    print(f"model: {n / 1e9:.3f}B parameters; layout TP {p.tensor_model_parallel_size} x PP "
          f"{p.pipeline_model_parallel_size}{f' x CP {p.context_parallel_size}' if p.context_parallel_size > 1 else ''} "
          f"x DP {data_parallel_size(cfg, world)}, ZeRO {cfg.optim.zero_stage}, "
          f"{num_micro_batches(cfg, world)} micro-batches of {cfg.train.micro_batch_size} per step")
    moe = bool(cfg.model.num_experts)
    a2a = all_to_all_bytes(cfg, world, cfg.train.bf16 or cfg.train.fp16)
    if moe:
        print(f"experts: {cfg.model.num_experts} per MoE layer, {cfg.model.num_experts // p.expert_model_parallel_size}"
              f" per GPU (EP {p.expert_model_parallel_size}), top-{cfg.model.moe_router_topk}; all-to-all "
              f"{a2a / gib:,.1f} GiB per step, all GPUs together ({a2a / world / gib:,.2f} GiB sent per GPU)")
    if p.context_parallel_size > 1:
        print(f"context parallelism: CP {p.context_parallel_size}, {' '.join(dict.fromkeys(p.cp_comm_type))}; "
              f"{context_parallel_bytes(cfg, world) / gib:.2f} GiB to torch.distributed per step per GPU (stage 0)")
    print(f"{'stage':>5} {'params/GPU':>12}{' of experts' if moe else ''} {'params GiB':>11} {'grads GiB':>10} "
          f"{'Adam GiB':>9} {'activ. GiB':>11} {'total GiB':>10}")
    for s in stages:
        experts = f" {s.expert_parameters / 1e6:>10.1f}M" if moe else ""
        print(f"{s.stage:>5} {s.parameters / 1e6:>11.1f}M{experts} {s.param_bytes / gib:>11.2f} "
              f"{s.grad_bytes / gib:>10.2f} {s.optimizer_bytes / gib:>9.2f} {s.activation_bytes / gib:>11.2f} "
              f"{s.total / gib:>10.2f}")
    model_flops, done, active = flops(cfg, vocab)
    print(f"FLOPs per token: {model_flops / 1e9:.2f} GFLOP (model, forward and backward; {done / 1e9:.2f} done with "
          f"recomputation) from {active / 1e9:.3f}B matmul parameters a token uses (MoE: the top-k experts; MTP "
          f"modules included)")
    peak = cfg.logging.peak_tflops or 989.0
    secs = step_seconds(cfg, world, vocab, peak, args.mfu_)
    print(f"step time at {100 * args.mfu_:.0f}% MFU of {peak:.0f} TFLOP/s per GPU: {secs:.2f} s "
          f"({cfg.train.global_batch_size * cfg.model.seq_length / secs:,.0f} tokens/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
