"""Rules of the parallel layout that involve the model's shape: pipeline stages and context parallelism (MoE's are
in ``config_moe.py``). Each message names the flag and the rule."""
from __future__ import annotations

from typing import TYPE_CHECKING

from megalm.config_fields import ConfigError

if TYPE_CHECKING:  # config.py imports this module
    from megalm.config import Config

CP_COMM_TYPES = ("allgather", "p2p", "a2a")  # Megatron's names for how CP attention reaches the other ranks


def validate_pipeline(cfg: Config) -> None:
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


def validate_context_parallel(cfg: Config) -> None:
    m, p = cfg.model, cfg.parallel
    cp, tp = p.context_parallel_size, p.tensor_model_parallel_size
    for kind in p.cp_comm_type:
        if kind not in CP_COMM_TYPES:
            raise ConfigError(f"--cp-comm-type {kind}: choose from {', '.join(CP_COMM_TYPES)}")
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
