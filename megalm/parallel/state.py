"""Process topology: who this rank is in the tensor-, data- and pipeline-parallel groups, and how it was launched.

Rank order is Megatron's: tensor parallelism innermost (the ranks of one TP group share a node), then context
parallelism, then data parallelism, then pipeline stages:
``rank = ((pp_rank * DP + dp_rank) * CP + cp_rank) * TP + tp_rank``. Experts fold onto the same
ranks (Megatron's "parallel folding"): the TP x DP ranks of a stage, numbered ``dp_rank * TP + tp_rank``, are
split expert-tensor-parallel (ETP: each expert's width split) innermost, then EP (the experts split), then
expert-data-parallel (the ranks that hold the same expert shards). One ``Topology`` object is
built at start-up and passed explicitly.
"""
from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """The requested parallel layout cannot be built from the world size and model shape."""


@dataclass
class Topology:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    dp: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    sequence_parallel: bool = False
    pp: int = 1
    pp_rank: int = 0
    tp_group: Optional[object] = field(default=None, repr=False)
    dp_group: Optional[object] = field(default=None, repr=False)
    pp_group: Optional[object] = field(default=None, repr=False)
    pp_ranks: tuple = (0,)  # global ranks of this rank's pipeline, stage 0 first
    embedding_group: Optional[object] = field(default=None, repr=False)  # first and last stage, for tied weights
    cp: int = 1
    cp_rank: int = 0
    cp_comm_types: tuple = ("allgather",)  # how CP attention reaches the other ranks' keys: one, or one per layer
    cp_group: Optional[object] = field(default=None, repr=False)
    dp_cp_group: Optional[object] = field(default=None, repr=False)  # DP x CP: where gradients are reduced
    tp_cp_group: Optional[object] = field(default=None, repr=False)  # TP x CP: one micro-batch's tokens under SP
    ep: int = 1
    ep_rank: int = 0
    edp: int = 1  # expert data parallelism: ranks holding the same expert shards
    edp_rank: int = 0
    etp: int = 1  # expert tensor parallelism: ranks splitting each expert's width
    etp_rank: int = 0
    ep_group: Optional[object] = field(default=None, repr=False)
    edp_group: Optional[object] = field(default=None, repr=False)
    etp_group: Optional[object] = field(default=None, repr=False)

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def token_split(self) -> tuple:
        """(group, size) of the ranks that share one micro-batch's tokens, each holding its own part: CP, and TP
        under sequence parallelism; (None, 1) when a rank holds them all. What MoE routing statistics sum over."""
        if self.sequence_parallel and self.cp > 1:
            return self.tp_cp_group, self.tp * self.cp
        if self.sequence_parallel:
            return self.tp_group, self.tp
        return (self.cp_group, self.cp) if self.cp > 1 else (None, 1)

    def cp_comm_type(self, layer: int) -> str:
        """The context-parallel attention of layer ``layer`` (``--cp-comm-type``: one for all, or one per layer)."""
        return self.cp_comm_types[layer if len(self.cp_comm_types) > 1 else 0]

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int, cp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.tp + tp_rank

    @classmethod
    def build(cls, tp: int = 1, sequence_parallel: bool = False, pp: int = 1, ep: int = 1,
              experts: bool = False, etp: int = 1, cp: int = 1, cp_comm_type=("allgather",)) -> "Topology":
        """Groups for the current process group (a single process when torch.distributed is not initialised).
        ``sequence_parallel`` splits activations between blocks along the sequence over the TP group; with
        ``experts`` (an MoE model) the expert groups are built too, ``ep`` ranks splitting each layer's experts."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        if tp < 1 or pp < 1 or cp < 1 or world % (tp * pp * cp):
            raise LayoutError(f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
                              f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}")
        dp = world // (tp * pp * cp)
        stage = tp * cp * dp  # the ranks of one pipeline stage, over which experts fold
        if ep < 1 or etp < 1 or stage % (ep * etp):
            raise LayoutError(f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} does not "
                              f"divide the {stage} ranks of a pipeline stage")
        local = rank % stage  # this rank's place among its stage's ranks
        n = ep * etp
        topo = cls(world_size=world, rank=rank, tp=tp, dp=dp, tp_rank=rank % tp, dp_rank=rank // (tp * cp) % dp,
                   sequence_parallel=sequence_parallel and tp > 1, pp=pp, pp_rank=rank // (tp * cp * dp),
                   cp=cp, cp_rank=rank // tp % cp,
                   cp_comm_types=(cp_comm_type,) if isinstance(cp_comm_type, str) else tuple(cp_comm_type),
                   ep=ep, ep_rank=local // etp % ep, edp=stage // n, edp_rank=local // n, etp=etp,
                   etp_rank=local % etp)
        topo.pp_ranks = tuple(topo.rank_of(topo.tp_rank, topo.dp_rank, s, topo.cp_rank) for s in range(pp))
        if dist.is_initialized():
            # every rank must create every group, in the same order
            at = topo.rank_of
            cps = range(cp)
            layouts = [("tp_group", [[at(t, d, s, c) for t in range(tp)] for s in range(pp) for d in range(dp)
                                     for c in cps]),
                       ("dp_group", [[at(t, d, s, c) for d in range(dp)] for s in range(pp) for t in range(tp)
                                     for c in cps]),
                       ("pp_group", [[at(t, d, s, c) for s in range(pp)] for d in range(dp) for t in range(tp)
                                     for c in cps]),
                       ("embedding_group", [[at(t, d, 0, c), at(t, d, pp - 1, c)] for d in range(dp)
                                            for t in range(tp) for c in cps] if pp > 1 else []),
                       ("cp_group", [[at(t, d, s, c) for c in cps] for s in range(pp) for d in range(dp)
                                     for t in range(tp)] if cp > 1 else []),
                       ("dp_cp_group", [[at(t, d, s, c) for d in range(dp) for c in cps] for s in range(pp)
                                        for t in range(tp)] if cp > 1 else []),
                       ("tp_cp_group", [[at(t, d, s, c) for c in cps for t in range(tp)] for s in range(pp)
                                        for d in range(dp)] if cp > 1 and tp > 1 else []),
                       ("etp_group", [[s * stage + b * etp + i for i in range(etp)] for s in range(pp)
                                      for b in range(stage // etp)] if experts else []),
                       ("ep_group", [[s * stage + e * n + j * etp + i for j in range(ep)] for s in range(pp)
                                     for e in range(stage // n) for i in range(etp)] if experts else []),
                       ("edp_group", [[s * stage + e * n + j for e in range(stage // n)] for s in range(pp)
                                      for j in range(n)] if experts else [])]
            for attr, groups in layouts:
                for ranks in groups:
                    group = dist.new_group(ranks)
                    if rank in ranks:
                        setattr(topo, attr, group)
        return topo


def _first_slurm_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True).stdout.split()
        if out:
            return out[0]
    return nodelist.split(",")[0].split("[")[0]


def launch_environment(env=os.environ) -> dict:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from whichever launcher started us:
    torchrun or the deepspeed launcher, srun without torchrun, or mpirun (Open MPI or MPICH/PMI)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return {"rank": int(env["RANK"]), "world_size": int(env["WORLD_SIZE"]),
                "local_rank": int(env.get("LOCAL_RANK", 0)), "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
                "master_port": env.get("MASTER_PORT", "29500")}
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return {"rank": int(env["SLURM_PROCID"]), "world_size": int(env["SLURM_NTASKS"]),
                "local_rank": int(env.get("SLURM_LOCALID", 0)),
                "master_addr": env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
                "master_port": env.get("MASTER_PORT", "29500")}
    for rank_var, size_var, local_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                           "OMPI_COMM_WORLD_LOCAL_RANK"),
                                          ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID")):
        if rank_var in env and size_var in env:
            return {"rank": int(env[rank_var]), "world_size": int(env[size_var]),
                    "local_rank": int(env.get(local_var, 0)), "master_addr": env.get("MASTER_ADDR", "127.0.0.1"),
                    "master_port": env.get("MASTER_PORT", "29500")}
    return {"rank": 0, "world_size": 1, "local_rank": 0, "master_addr": "127.0.0.1", "master_port": "29500"}


def init_distributed(timeout_minutes: float = 10.0, single: bool = False) -> dict:
    """Join the process group the launcher describes (gloo on CPU, NCCL on GPU); for one process a no-op, or with
    ``single`` a group of one in memory (DeepSpeed's engine needs a process group even on one device)."""
    launch = launch_environment()
    if launch["world_size"] == 1 and single and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    if launch["world_size"] > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(launch["local_rank"] % torch.cuda.device_count())
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{launch['master_addr']}:{launch['master_port']}",
                                rank=launch["rank"], world_size=launch["world_size"],
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return launch


def collective_device() -> torch.device:
    """Where a small host-side value (a count, a stop flag) must live to go through a collective: NCCL takes
    only CUDA tensors, gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def host_all_reduce(values: list, op=dist.ReduceOp.SUM, group=None) -> list:
    """Small host-side values (a flag, a count) reduced over ``group`` (default: every rank) as Python floats,
    through a tensor on the device the backend takes (``collective_device``)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=op, group=group)
    return _to_host(t)


def host_all_gather(values: list, rank: int, world_size: int) -> list:
    """Every rank's ``values`` (a few floats: flags, timings), ``[[rank 0's], [rank 1's], ...]``, through one
    all-reduce of a vector in which each rank fills its own slots (gloo has no uneven all-gather)."""
    n = len(values)
    slots = [0.0] * (n * world_size)
    slots[rank * n:(rank + 1) * n] = values
    total = host_all_reduce(slots)
    return [total[r * n:(r + 1) * n] for r in range(world_size)]


def _to_host(t: torch.Tensor) -> list:
    return t.tolist()


def destroy_distributed(barrier: bool = True) -> None:
    """Always called before exit: without it gloo sometimes aborts at shutdown. ``barrier=False`` on an error
    path, where the other ranks may never arrive."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
