"""Context parallelism at a long sequence, in one run (CPU, gloo, fp32, one micro-batch forward + backward):

(a) per-rank bytes of the activations saved for backward (counted with ``torch.autograd.graph.saved_tensors_hooks``,
    parameters excluded, each storage once) at CP 1 (the same flash attention that returns its log-sum-exp) and at
    CP 2 and 4 with each ``--cp-comm-type``; target for p2p and a2a: at most 1/CP + 15% of CP 1's;
(b) bytes each rank hands to torch.distributed (send buffers, counted around the calls) against
    ``megalm.parallel.context.comm_bytes``, the formula README gives (target ratio 1.00);
(c) ring overlap: the share of the ring's transfer time hidden behind block compute: one layer's ring attention
    as megalm runs it against the same with every exchange waited for at once, the time saved over the bare
    transfer time of its exchanges replayed alone.

python bench/bench_cp.py [--seq 8192] [--hidden 64] [--heads 8] [--groups 4] [--layers 2] [--repeats 2]
"""
import argparse
import os
import platform
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.config import Config, finalize  # noqa: E402
from megalm.model.gpt import GPT  # noqa: E402
from megalm.parallel.context import comm_bytes, split_batch  # noqa: E402
from megalm.parallel.state import Topology  # noqa: E402

VOCAB = 512


def model_config(a):
    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", VOCAB - 1
    m = cfg.model
    m.hidden_size, m.num_attention_heads, m.num_query_groups, m.num_layers = a.hidden, a.heads, a.groups, a.layers
    m.seq_length = m.max_position_embeddings = a.seq
    m.position_embedding_type, m.normalization, m.swiglu = "rope", "RMSNorm", True
    return finalize(cfg).model


class Counters:
    """Wraps the torch.distributed calls megalm's context parallelism makes: bytes of every send buffer."""

    def __init__(self):
        self.sent = 0
        self._real = {}

    def install(self):
        def counted(name, arg):
            real = getattr(dist, name)
            self._real[name] = real

            def call(*args, **kwargs):
                self.sent += args[arg].numel() * args[arg].element_size()
                return real(*args, **kwargs)
            setattr(dist, name, call)
        counted("all_gather_into_tensor", 1)
        counted("reduce_scatter_tensor", 1)
        counted("all_to_all_single", 1)
        counted("all_reduce", 0)
        real_batch = self._real["batch_isend_irecv"] = dist.batch_isend_irecv

        def batch(ops):
            self.sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
            return real_batch(ops)
        dist.batch_isend_irecv = batch

    def uninstall(self):
        for name, real in self._real.items():
            setattr(dist, name, real)


def saved_bytes(run):
    """Bytes of the non-parameter tensors autograd saves while ``run()`` builds the graph (each storage once)."""
    seen, total = set(), [0]

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total[0] += key[1]
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    return loss, total[0]


def ring_overlap(a, topo, world) -> dict:
    """One layer's ring attention, forward and backward, as megalm runs it (each exchange posted before the block
    it overlaps) and with every exchange waited for at once (nothing overlaps), each the best of 5; and the bare
    transfer time of its exchanges replayed alone. Hidden share = (serial - overlapped) / bare."""
    from megalm.parallel import ring as R

    d, local = a.hidden // a.heads, a.seq // world
    g = torch.Generator().manual_seed(topo.cp_rank)
    q = torch.randn(1, a.heads, local, d, generator=g).requires_grad_()
    k, v = (torch.randn(1, a.groups, local, d, generator=g).requires_grad_() for _ in range(2))
    sizes = []

    def once():
        dist.barrier()
        start = time.perf_counter()
        out = R.ring_attention(q, k, v, topo.cp_group, d ** -0.5)
        out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    real_start = R.Ring.start

    def recorded(self, send):
        sizes.append(send)
        return real_start(self, send)

    def serial(self, send):
        recv, reqs = real_start(self, send)
        for req in reqs:
            req.wait()
        return recv, []

    R.Ring.start = recorded
    overlapped = min(once() for _ in range(5))
    R.Ring.start = serial
    blocking = min(once() for _ in range(5))
    R.Ring.start = real_start
    bare = 0.0
    for msg in sizes[:len(sizes) // 5]:  # one run's exchanges
        dist.barrier()
        start = time.perf_counter()
        for req in real_start(R.Ring(topo.cp_group), msg)[1]:
            req.wait()
        bare += time.perf_counter() - start
    return {"ring_overlapped": overlapped, "ring_serial": blocking, "ring_bare": bare}


def worker(rank, world, a, kind, port, out):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    topo = Topology.build(cp=world, cp_comm_type=kind)
    torch.manual_seed(0)
    model = GPT(model_config(a), VOCAB, topo).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, a.seq + 1), generator=g)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}
    if world > 1:
        batch = split_batch(batch, world, topo.cp_rank)
    counters = Counters()
    if world > 1:
        counters.install()
    seconds = []
    for _ in range(a.repeats):
        counters.sent = 0
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        loss, saved = saved_bytes(lambda: model(**batch).sum() / a.seq)
        loss.backward()
        seconds.append(time.perf_counter() - start)
    result = {"saved": saved, "sent": counters.sent, "seconds": min(seconds)}
    if world > 1:
        counters.uninstall()
        if kind == "p2p":
            result.update(ring_overlap(a, topo, world))
        dist.barrier()
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"{kind}-{world}-{rank}.pt"))


def run(a, world, kind, out):
    if world == 1:
        worker(0, 1, a, kind, 0, out)
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(world, a, kind, port, out), nprocs=world)
    return [torch.load(os.path.join(out, f"{kind}-{world}-{r}.pt")) for r in range(world)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4])
    a = ap.parse_args()
    print(f"# bench_cp: seq {a.seq}, hidden {a.hidden}, heads {a.heads}, kv groups {a.groups}, layers {a.layers}, "
          f"fp32, one micro-batch; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    head_dim = a.hidden // a.heads
    with tempfile.TemporaryDirectory() as out:
        base = run(a, 1, "allgather", out)[0]
        print(f"CP 1: saved for backward {base['saved'] / 2**20:.1f} MiB; {base['seconds']:.2f} s forward+backward")
        print(f"{'CP':>3} {'type':>9} {'saved MiB/rank':>15} {'x CP 1':>7} {'target':>7} {'sent MiB/rank':>14} "
              f"{'formula':>8} {'ratio':>6} {'overlap':>8} {'s':>6}")
        notes = []
        for world in a.sizes:
            for kind in ("allgather", "p2p", "a2a"):
                ranks = run(a, world, kind, out)
                saved = max(r["saved"] for r in ranks)
                sent = max(r["sent"] for r in ranks)
                formula = a.layers * comm_bytes(kind, world, 1, a.seq, a.heads, a.groups, head_dim, 4)
                target = f"{1 / world + 0.15:.3f}" if kind != "allgather" else "-"
                overlap = "-"
                if kind == "p2p":
                    bare = max(r["ring_bare"] for r in ranks)
                    gain = max(r["ring_serial"] for r in ranks) - max(r["ring_overlapped"] for r in ranks)
                    overlap = f"{min(1.0, max(0.0, gain / bare)):.0%}"
                    notes.append(f"CP {world} ring, one layer forward+backward: {1e3 * bare:.1f} ms of bare "
                                 f"transfers; {1e3 * max(r['ring_serial'] for r in ranks):.1f} ms with every "
                                 f"exchange waited for at once, "
                                 f"{1e3 * max(r['ring_overlapped'] for r in ranks):.1f} ms overlapped")
                print(f"{world:>3} {kind:>9} {saved / 2**20:>15.1f} {saved / base['saved']:>7.3f} {target:>7} "
                      f"{sent / 2**20:>14.2f} {formula / 2**20:>8.2f} {sent / formula:>6.3f} {overlap:>8} "
                      f"{max(r['seconds'] for r in ranks):>6.2f}")
        print("\n".join(notes))


if __name__ == "__main__":
    main()
