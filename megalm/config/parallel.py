"""The parallel section: how ranks split the model (TP, SP, CP, PP, EP) and whether DeepSpeed's engine runs it.
Rules that need the model's shape or the world size are in ``layout.py``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from megalm.config.fields import ConfigError, opt, positive, positive_if_set

CP_COMM_TYPES = ("allgather", "p2p", "a2a")  # Megatron's names for how CP attention reaches the other ranks


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = opt(1, "ranks that split each layer")
    distributed_timeout_minutes: float = opt(10.0, "a collective waiting longer than this fails (a dead or hung "
                                             "rank), ending the job instead of hanging it")
    sequence_parallel: bool = opt(False, "split norms, dropout and activations between blocks along the sequence "
                                  "over the TP ranks (no effect at TP 1)")
    pipeline_model_parallel_size: int = opt(1, "pipeline stages that split the layers")
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(None, "interleaved 1F1B: layers per virtual stage "
                                                               "(each rank holds several non-adjacent chunks)")
    deepspeed: bool = opt(False, "train with DeepSpeed's engine (launch with the deepspeed launcher or torchrun)")
    deepspeed_config: Optional[str] = opt(None, "DeepSpeed JSON config to add to the one rendered from the flags",
                                          flag="--deepspeed_config")
    use_torch_fsdp2: bool = opt(False, "shard parameters, gradients and Adam state over data parallelism with "
                                "PyTorch's FSDP2 (fully_shard per transformer block; megalm's ZeRO 3), under TP, "
                                "SP, CP, PP and EP")
    fsdp_reshard_after_forward: bool = opt(True, "with --use-torch-fsdp2: keep each block's gathered parameters "
                                           "from forward to backward (more memory, one all-gather less per block)",
                                           flag="--no-fsdp-reshard-after-forward", negate=True)
    pipeline_stage_layers: list = opt([], "uneven pipeline split: layers of each stage, e.g. 3 3 2 (default: "
                                      "--num-layers / --pipeline-model-parallel-size each)", nargs="+")
    context_parallel_size: int = opt(1, "ranks that split each sequence (CP), between TP and DP in the rank order; "
                                     "each holds chunks i and 2 CP - 1 - i")
    cp_comm_type: list = opt(["allgather"], "how context-parallel attention sees the other ranks' keys and values: "
                             "all-gathered (allgather), passed round a ring while blocks are computed (p2p), or "
                             "heads exchanged for sequence with all-to-all (a2a, Ulysses); one, or one per layer",
                             nargs="+", choices=CP_COMM_TYPES)
    expert_model_parallel_size: int = opt(1, "ranks that split the experts of each MoE layer (EP); experts fold "
                                          "onto the ranks attention uses, as ETP x EP x expert-DP")
    expert_tensor_parallel_size: int = opt(1, "ranks that split each expert's width (ETP), innermost of the "
                                           "expert ranks")

    @property
    def model_parallel_size(self) -> int:
        """Ranks of one data-parallel replica: TP x CP x PP."""
        return self.tensor_model_parallel_size * self.context_parallel_size * self.pipeline_model_parallel_size


def validate_parallel(p: ParallelConfig) -> None:
    for value, flag in [(p.tensor_model_parallel_size, "--tensor-model-parallel-size"),
                        (p.pipeline_model_parallel_size, "--pipeline-model-parallel-size"),
                        (p.context_parallel_size, "--context-parallel-size")]:
        positive(value, flag)
    positive_if_set([(p.num_layers_per_virtual_pipeline_stage, "--num-layers-per-virtual-pipeline-stage"),
                     (p.distributed_timeout_minutes, "--distributed-timeout-minutes")])
    for kind in p.cp_comm_type:
        if kind not in CP_COMM_TYPES:
            raise ConfigError(f"--cp-comm-type {kind}: choose from {', '.join(CP_COMM_TYPES)}")
    if p.deepspeed_config and not p.deepspeed:
        raise ConfigError("--deepspeed_config needs --deepspeed")
    if p.deepspeed_config and not os.path.exists(p.deepspeed_config):
        raise ConfigError(f"--deepspeed_config: no such file {p.deepspeed_config}")
