"""Run under torchrun at TP 2: one column-parallel and one row-parallel FP8 matmul (forward and both gradients)
against the same matmuls on the whole tensors, with the scales reduced over the TP group as megalm does and
with each rank's own (``--no-reduce``); rank 0 writes the relative errors."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megalm.parallel.fp8 import FP8Spec, linear  # noqa: E402
from megalm.parallel.state import Topology, destroy_distributed, init_distributed  # noqa: E402


def err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(recipe: str, mesh, topo: Topology) -> dict:
    g = torch.Generator().manual_seed(0)
    m, k, n = 64, 128, 64
    # the halves TP splits differ in scale, so a rank's own amax is not the tensor's
    x = torch.randn(m, k, generator=g) * torch.cat([torch.full((k // 2,), 8.0), torch.ones(k // 2)])
    w = torch.randn(n, k, generator=g) * torch.cat([torch.full((n // 2, 1), 4.0), torch.ones(n // 2, 1)])
    dy = torch.randn(m, n, generator=g) * torch.cat([torch.full((n // 2,), 3.0), torch.ones(n // 2)])

    def fp8(split, mesh=None):
        return FP8Spec(recipe, torch.float8_e5m2, True, split, mesh)

    def grads(xx, ww, spec, grad):
        xx, ww = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        y = linear(xx, ww, None, spec)
        y.backward(grad)
        return y.detach(), xx.grad, ww.grad

    y, gx, gw = grads(x, w, fp8(None), dy)  # one process: the whole tensors
    r = topo.tp_rank
    cols, rows = slice(r * n // 2, (r + 1) * n // 2), slice(r * k // 2, (r + 1) * k // 2)
    out = {}
    cy, cgx, cgw = grads(x, w[cols], fp8("out", mesh), dy[:, cols])  # column-parallel: W split by outputs
    dist.all_reduce(cgx, group=topo.tp_group)  # what enter_tp_region's backward does
    out["column"] = max(err(cy, y[:, cols]), err(cgx, gx), err(cgw, gw[cols]))
    ry, rgx, rgw = grads(x[:, rows], w[:, rows], fp8("in", mesh), dy)  # row-parallel: split along K
    dist.all_reduce(ry, group=topo.tp_group)  # what leave_tp_region does
    out["row"] = max(err(ry, y), err(rgx, gx[:, rows]), err(rgw, gw[:, rows]))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_distributed()
    topo = Topology.build(tp=dist.get_world_size())
    from torch.distributed.device_mesh import DeviceMesh

    mesh = DeviceMesh.from_group(topo.tp_group, "cpu")
    result = {f"{recipe}-{kind}": run(recipe, mesh if kind == "tp-group" else None, topo)
              for recipe in ("tensorwise", "rowwise", "mxfp8") for kind in ("tp-group", "own-rank")}
    if topo.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(result, fh)
    destroy_distributed()


if __name__ == "__main__":
    main()
