"""Rules of the parallel layout that involve the model's shape: pipeline stages and context parallelism (MoE's are
in ``config_moe.py``). Each message names the flag and the rule."""
from __future__ import annotations

from typing import TYPE_CHECKING

from megalm.config_fields import ConfigError

if TYPE_CHECKING:  # config.py imports this module
    from megalm.config import Config


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
    if cp == 1:
        return
    if m.seq_length % (2 * cp):
        raise ConfigError(f"--seq-length {m.seq_length} is not divisible by 2 x --context-parallel-size {cp} (each "
                          f"rank holds two chunks of every sequence)")
    if p.sequence_parallel and tp > 1 and (m.seq_length // cp) % tp:
        raise ConfigError(f"--sequence-parallel: each context-parallel rank's {m.seq_length // cp} tokens are not "
                          f"divisible by --tensor-model-parallel-size {tp}")
    if p.cp_comm_type == "p2p":
        raise ConfigError("--cp-comm-type p2p (ring attention) is not implemented yet: use a2a or allgather")
    if p.cp_comm_type == "a2a" and ((m.num_attention_heads // tp) % cp or (m.num_query_groups // tp) % cp):
        raise ConfigError(f"--cp-comm-type a2a splits heads over --context-parallel-size {cp}: each TP rank's "
                          f"{m.num_attention_heads // tp} heads and {m.num_query_groups // tp} key/value groups must "
                          f"divide by it")
    if m.num_experts:
        raise ConfigError("--context-parallel-size with --num-experts is not implemented yet")
    if p.deepspeed:
        raise ConfigError("--context-parallel-size with --deepspeed is not supported: use megalm's own path")
