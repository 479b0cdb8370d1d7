"""RNG for dropout under tensor parallelism (Megatron's "model-parallel RNG tracker").

Dropout on replicated activations uses the default generator, seeded alike on every TP rank so the masks agree.
Dropout on activations that differ per TP rank (attention probabilities of this rank's heads, sequence shards
under sequence parallelism) runs inside ``tracker.fork()``, which swaps in a generator seeded per TP rank. Both
seeds are offset per pipeline stage and per context-parallel rank (``rank_seed``): other stages run other layers
and other CP ranks hold other tokens of the sequence, so their masks must not repeat (Megatron offsets by stage).
"""
from __future__ import annotations

import contextlib

import torch

TP_SEED_OFFSET = 2718
PP_SEED_STRIDE = 100  # Megatron's offset per pipeline stage
CP_SEED_STRIDE = 1_000_003  # per context-parallel rank: past any stage count


def rank_seed(seed: int, topo) -> int:
    """The dropout seed of this rank's pipeline stage and CP rank (the same on the TP and DP ranks of both)."""
    return seed + PP_SEED_STRIDE * topo.pp_rank + CP_SEED_STRIDE * topo.cp_rank


class RNGTracker:
    def __init__(self, seed: int = 0, tp_rank: int = 0):
        self.seed(seed, tp_rank)

    def seed(self, seed: int, tp_rank: int) -> None:
        gen = torch.Generator().manual_seed(seed + TP_SEED_OFFSET + tp_rank)
        self.cpu_state = gen.get_state()
        self.cuda_state = None
        if torch.cuda.is_available():
            saved = torch.cuda.get_rng_state()
            torch.cuda.manual_seed(seed + TP_SEED_OFFSET + tp_rank)
            self.cuda_state = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self):
        """Run the body on this rank's own generator; the default generator is left as it was."""
        saved_cpu = torch.get_rng_state()
        torch.set_rng_state(self.cpu_state)
        saved_cuda = None
        if self.cuda_state is not None:
            saved_cuda = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(self.cuda_state)
        try:
            yield
        finally:
            self.cpu_state = torch.get_rng_state()
            torch.set_rng_state(saved_cpu)
            if saved_cuda is not None:
                self.cuda_state = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)

    def state_dict(self) -> dict:
        out = {"cpu": self.cpu_state}
        if self.cuda_state is not None:
            out["cuda"] = self.cuda_state
        return out

    def load_state_dict(self, state: dict) -> None:
        self.cpu_state = state["cpu"]
        if "cuda" in state and torch.cuda.is_available():
            self.cuda_state = state["cuda"]
