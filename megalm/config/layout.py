"""The rules that involve more than one section, in one place: the parallel layout against the model's shape and
the world size (tensor, pipeline, context and expert parallelism), the batch against data parallelism, and what
the DeepSpeed path does not run. Each message names the flag and the rule."""
from __future__ import annotations

from typing import Optional

from megalm.config.fields import ConfigError


def data_parallel_size(cfg, world_size: int) -> int:
    return max(world_size // cfg.parallel.model_parallel_size, 1)


def num_micro_batches(cfg, world_size: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step."""
    t = cfg.train
    return t.global_batch_size // (t.micro_batch_size * data_parallel_size(cfg, world_size))


def validate_layout(cfg, world_size: Optional[int] = None) -> None:
    _tensor_parallel(cfg, world_size)
    _pipeline(cfg)
    _context_parallel(cfg)
    _experts(cfg, world_size)
    _batch(cfg, world_size)
    _deepspeed(cfg)
    _fp8(cfg)


def _tensor_parallel(cfg, world_size: Optional[int]) -> None:
    m, p = cfg.model, cfg.parallel
    tp = p.tensor_model_parallel_size
    if m.num_attention_heads % tp:
        raise ConfigError(f"--num-attention-heads {m.num_attention_heads} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if m.num_query_groups % tp:
        raise ConfigError(f"--num-query-groups {m.num_query_groups} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if m.ffn_hidden_size % tp:
        raise ConfigError(f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if p.sequence_parallel and tp > 1 and m.seq_length % tp:
        raise ConfigError(f"--sequence-parallel: --seq-length {m.seq_length} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if world_size is not None and world_size % p.model_parallel_size:
        raise ConfigError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                          f"--pipeline-model-parallel-size {p.pipeline_model_parallel_size}"
                          + (f" x --context-parallel-size {p.context_parallel_size}"
                             if p.context_parallel_size > 1 else ""))


def _pipeline(cfg) -> None:
    m, p = cfg.model, cfg.parallel
    pp, vpp, counts = p.pipeline_model_parallel_size, p.num_layers_per_virtual_pipeline_stage, p.pipeline_stage_layers
    if pp > m.num_layers:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} is larger than --num-layers {m.num_layers}: "
                          f"every stage needs at least one layer")
    if counts:
        try:
            p.pipeline_stage_layers = counts = [int(c) for c in counts]
        except ValueError:
            raise ConfigError(f"--pipeline-stage-layers {' '.join(map(str, counts))}: expected integers") from None
        if len(counts) != pp or sum(counts) != m.num_layers or min(counts) < 1:
            raise ConfigError(f"--pipeline-stage-layers {' '.join(map(str, counts))}: needs "
                              f"--pipeline-model-parallel-size ({pp}) positive counts that sum to --num-layers "
                              f"({m.num_layers})")
        if vpp is not None:
            raise ConfigError("--pipeline-stage-layers cannot be combined with "
                              "--num-layers-per-virtual-pipeline-stage")
    elif m.num_layers % pp:
        raise ConfigError(f"--num-layers {m.num_layers} is not divisible by --pipeline-model-parallel-size {pp} "
                          f"(or give the per-stage counts with --pipeline-stage-layers)")
    if vpp is not None:
        if pp < 2:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        if (m.num_layers // pp) % vpp or m.num_layers // pp == vpp:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {vpp} must divide the {m.num_layers // pp} "
                              f"layers of each pipeline stage into at least two chunks")


def _context_parallel(cfg) -> None:
    m, p = cfg.model, cfg.parallel
    cp, tp = p.context_parallel_size, p.tensor_model_parallel_size
    if len(p.cp_comm_type) not in (1, m.num_layers):
        raise ConfigError(f"--cp-comm-type gives {len(p.cp_comm_type)} types: give one, or one per layer "
                          f"(--num-layers {m.num_layers})")
    if cp == 1:
        return
    if m.seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {m.seq_length} is not divisible by 2 x --context-parallel-size {cp} (each "
                          f"rank holds two chunks of every sequence)")
    if p.sequence_parallel and tp > 1 and (m.seq_length // cp) % tp:
        raise ConfigError(f"--sequence-parallel: each context-parallel rank's {m.seq_length // cp} tokens are not "
                          f"divisible by --tensor-model-parallel-size {tp}")
    if "p2p" in p.cp_comm_type and m.attention_dropout > 0:
        raise ConfigError(f"--cp-comm-type p2p computes attention block by block, merged by log-sum-exp, and has no "
                          f"attention dropout: set --attention-dropout 0 (it is {m.attention_dropout}), or use "
                          f"allgather or a2a")
    if "a2a" in p.cp_comm_type and ((m.num_attention_heads // tp) % cp or (m.num_query_groups // tp) % cp):
        raise ConfigError(f"--cp-comm-type a2a splits heads over --context-parallel-size {cp}: each TP rank's "
                          f"{m.num_attention_heads // tp} heads and {m.num_query_groups // tp} key/value groups must "
                          f"divide by it")
    if p.deepspeed:
        raise ConfigError("--context-parallel-size with --deepspeed is not supported: use megalm's own path")
    if "p2p" in p.cp_comm_type and m.sliding_window is not None:
        raise ConfigError("--sliding-window with --cp-comm-type p2p: the ring computes whole blocks of the "
                          "sequence and does not mask a window; use allgather or a2a")


def _experts(cfg, world_size: Optional[int]) -> None:
    m, p = cfg.model, cfg.parallel
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    if not m.num_experts:
        if ep != 1 or etp != 1:
            raise ConfigError("--expert-model-parallel-size / --expert-tensor-parallel-size need --num-experts")
        return
    if ep < 1 or etp < 1:
        raise ConfigError("--num-experts, --expert-model-parallel-size and --expert-tensor-parallel-size must be "
                          "at least 1")
    if m.num_experts % ep:
        raise ConfigError(f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    if m.moe_ffn_hidden_size % etp:
        raise ConfigError(f"--moe-ffn-hidden-size {m.moe_ffn_hidden_size} is not divisible by "
                          f"--expert-tensor-parallel-size {etp}")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size is not None:
        attention_ranks = world_size // (tp * pp) * tp if world_size % (tp * pp) == 0 else None
        if attention_ranks is not None and attention_ranks % (ep * etp):
            raise ConfigError(f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} does not "
                              f"divide the {attention_ranks} ranks of a pipeline stage (TP {tp} x CP x DP "
                              f"{attention_ranks // tp})")
    if tp > 1 and not p.sequence_parallel:
        raise ConfigError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (as in Megatron: "
                          "each TP rank routes its own sequence shard)")
    if p.deepspeed:
        raise ConfigError("--num-experts with --deepspeed is not supported: use megalm's own path (EP, ZeRO 1/2)")
    shared = m.moe_shared_expert_intermediate_size
    if shared is not None and shared % tp:
        raise ConfigError(f"--moe-shared-expert-intermediate-size {shared} is not divisible by "
                          f"--tensor-model-parallel-size {tp}")
    if etp > 1 and m.add_bias_linear:
        raise ConfigError("--expert-tensor-parallel-size > 1 with biases in the experts (linear layers have biases "
                          "unless --disable-bias-linear): an expert's output bias would be added once per ETP rank")


def _batch(cfg, world_size: Optional[int]) -> None:
    t, p = cfg.train, cfg.parallel
    dp = data_parallel_size(cfg, world_size or 1)
    if t.global_batch_size is not None and t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
                          f"{t.micro_batch_size} x data-parallel size {dp}")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        gbs = t.global_batch_size or t.micro_batch_size * dp
        micro, pp = gbs // (t.micro_batch_size * dp), p.pipeline_model_parallel_size
        if micro % pp:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs the "
                              f"micro-batches per step ({micro} = --global-batch-size {gbs} / "
                              f"(--micro-batch-size {t.micro_batch_size} x DP {dp})) to be a multiple of "
                              f"--pipeline-model-parallel-size {pp}")


def _deepspeed(cfg) -> None:
    p, t, o, ck = cfg.parallel, cfg.train, cfg.optim, cfg.checkpoint
    if p.deepspeed and t.grad_reduce_in_bf16:
        raise ConfigError("--grad-reduce-in-bf16 is for megalm's optimizer; --deepspeed keeps the engine's own "
                          "mixed precision (set its reduction dtype in --deepspeed_config)")
    if o.zero_stage == 3 and not (p.deepspeed or p.use_torch_fsdp2):
        raise ConfigError("--zero-stage 3 (sharded parameters) needs --use-torch-fsdp2 or --deepspeed; megalm's own "
                          "optimizer does 0-2")
    if p.use_torch_fsdp2 and p.deepspeed:
        raise ConfigError("--use-torch-fsdp2 with --deepspeed: choose one (FSDP2 is megalm's own ZeRO 3; "
                          "DeepSpeed's is --deepspeed with a stage-3 --deepspeed_config)")
    if p.use_torch_fsdp2 and o.zero_stage in (1, 2):
        raise ConfigError(f"--use-torch-fsdp2 shards parameters, gradients and optimizer state itself: drop "
                          f"--zero-stage {o.zero_stage}" + (" / --use-distributed-optimizer"
                                                            if o.use_distributed_optimizer else ""))
    if not p.fsdp_reshard_after_forward and not p.use_torch_fsdp2:
        raise ConfigError("--no-fsdp-reshard-after-forward needs --use-torch-fsdp2")
    if p.deepspeed and p.pipeline_model_parallel_size > 1:
        raise ConfigError("--deepspeed runs data parallelism (ZeRO 0-3) with optional tensor and sequence "
                          "parallelism: for --pipeline-model-parallel-size > 1 use megalm's own path (drop "
                          "--deepspeed; --zero-stage 1/2 shards the optimizer there)")
    if ck.async_save and p.deepspeed:
        raise ConfigError("--async-save with --deepspeed: DeepSpeed writes its engine state itself, synchronously")


def _fp8(cfg) -> None:
    """FP8 matmuls take local widths that are multiples of 16 (32, the block, for MXFP8), along every dimension
    of the three matmuls: the model width, the MLP's and attention's widths per TP rank, and the tokens of a
    micro-batch."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    if not t.fp8_format:
        return
    need = 32 if t.fp8_recipe == "mxfp8" else 16
    tp, cp = p.tensor_model_parallel_size, p.context_parallel_size
    head = m.kv_channels or m.hidden_size // m.num_attention_heads
    widths = [("--hidden-size", m.hidden_size, m.hidden_size),
              ("--ffn-hidden-size / TP", m.ffn_hidden_size // tp, m.ffn_hidden_size),
              ("attention heads x head width / TP", m.num_attention_heads * head // tp, m.num_attention_heads * head),
              ("--micro-batch-size x --seq-length / CP", t.micro_batch_size * m.seq_length // cp,
               t.micro_batch_size * m.seq_length)]
    for what, local, whole in widths:
        if local % need:
            raise ConfigError(f"--fp8-format with --fp8-recipe {t.fp8_recipe}: {what} is {local} (of {whole}), not a "
                              f"multiple of {need}; FP8 matmuls cannot take it")
