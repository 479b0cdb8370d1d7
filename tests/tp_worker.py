"""Run under torchrun: one forward/backward of a fixed batch at a given TP size (and sequence parallelism); rank 0 saves the loss, the
gathered logits and every gathered, unpadded gradient for the parity test to compare with one process."""
import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from megalm.model.gpt import GPT  # noqa: E402
from megalm.parallel.state import Topology, destroy_distributed, init_distributed  # noqa: E402
from parity import FLAVOURS, VOCAB, fixed_batch, gather_full, parity_model_config, unpad  # noqa: E402


def run(flavour: str, topo: Topology) -> dict:
    model = GPT(parity_model_config(**FLAVOURS[flavour]), VOCAB, topo)
    model.init_weights(0)
    tokens, labels = fixed_batch()
    loss = model(tokens, labels).mean()
    loss.backward()
    for p in model.parameters():  # sequence parallelism: each TP rank holds a partial gradient of the norms
        if getattr(p, "sequence_parallel", False) and topo.sequence_parallel:
            dist.all_reduce(p.grad, group=topo.tp_group)
    grads = {n: unpad(gather_full(p.grad, getattr(p, "tp_dim", None), topo), p, VOCAB)
             for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(tokens)
    return {"loss": loss.detach(), "grads": grads, "logits": logits}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_distributed()
    topo = Topology.build(args.tp, args.sequence_parallel)
    results = {flavour: run(flavour, topo) for flavour in FLAVOURS}
    if topo.rank == 0:
        torch.save(results, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
