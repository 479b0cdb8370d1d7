"""Which layers each pipeline rank holds.

Plain split: stage ``r`` of ``P`` holds one contiguous run of layers (``L / P`` each, or the counts given with
``--pipeline-stage-layers``). Interleaved split (Megatron's virtual pipeline): the layers are cut into ``P x V``
chunks of ``--num-layers-per-virtual-pipeline-stage`` layers, and chunk ``c`` of rank ``r`` is virtual stage
``c * P + r``, so activations go round the ring of ranks ``V`` times.
"""
from __future__ import annotations

from typing import Optional, Sequence


def stage_chunks(num_layers: int, pp: int, pp_rank: int, layers_per_virtual_stage: Optional[int] = None,
                 stage_layers: Sequence[int] = ()) -> list:
    """Global layer indices of each chunk that rank ``pp_rank`` holds, in execution order."""
    if layers_per_virtual_stage:
        n = layers_per_virtual_stage
        virtual = num_layers // (pp * n)
        return [list(range((c * pp + pp_rank) * n, (c * pp + pp_rank + 1) * n)) for c in range(virtual)]
    counts = list(stage_layers) or [num_layers // pp] * pp
    start = sum(counts[:pp_rank])
    return [list(range(start, start + counts[pp_rank]))]
