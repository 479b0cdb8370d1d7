"""The MoE layer against references, in one run (CPU, fp32, forward + backward):

(a) megalm's MoE layer against transformers' Mixtral MoE block holding the same weights, both its grouped-matmul
    experts (what a Mixtral built from a config runs) and its per-expert loop (a bare block);
(b) dispatch overhead: the whole layer against the same grouped expert matmuls on tokens already sorted by expert
    (routing, permutation and combine are the difference);
(c) expert parallelism 2 (two gloo processes): bytes handed to torch.distributed per step, counted around the calls,
    against the algorithm's minimum (hidden x 4 bytes for every (token, expert) pair whose expert is on the other
    rank, dispatch and combine, forward and backward) plus the per-expert counts exchanged.

python bench/bench_moe.py [--tokens 2048] [--hidden 512] [--ffn 1792] [--experts 8] [--topk 2] [--repeats 5]
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.config import Config, finalize  # noqa: E402
from megalm.model.moe import MoELayer, MoEStats  # noqa: E402
from megalm.parallel.state import Topology  # noqa: E402


def moe_config(a, **extra):
    cfg = Config()
    cfg.data.tokenizer_type, cfg.data.vocab_size = "NullTokenizer", 100
    m = cfg.model
    m.hidden_size, m.num_attention_heads, m.num_layers, m.swiglu = a.hidden, 8, 1, True
    m.add_bias_linear = False  # Mixtral's experts and router have none
    m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size = a.experts, a.topk, a.ffn
    for k, v in extra.items():
        setattr(m, k, v)
    return finalize(cfg).model


def ours(a, topo=None):
    torch.manual_seed(0)
    layer = MoELayer(moe_config(a), topo or Topology(), "0", MoEStats(), None)
    for p in layer.parameters():
        p.data.normal_(0, 0.02)
    return layer.train()


def mixtral_blocks(a, layer):
    """transformers' Mixtral MoE block twice (grouped matmuls, per-expert loop) with ``layer``'s weights."""
    import transformers
    from transformers.models.mixtral import modeling_mixtral

    def config():  # one each: building a model records its experts implementation in the config
        return transformers.MixtralConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_local_experts=a.experts,
                                          num_experts_per_tok=a.topk, num_hidden_layers=1, num_attention_heads=8,
                                          num_key_value_heads=8, vocab_size=100)

    grouped = transformers.MixtralForCausalLM(config()).model.layers[0].mlp  # built from a config: grouped_mm
    loop = modeling_mixtral.MixtralSparseMoeBlock(config())  # a bare block: the per-expert loop
    with torch.no_grad():
        for block in (grouped, loop):
            block.gate.weight.copy_(layer.router.weight)
            e = layer.experts
            block.experts.gate_up_proj.copy_(torch.cat((e.w1, e.w3), dim=2).transpose(1, 2))
            block.experts.down_proj.copy_(e.w2.transpose(1, 2))
    return grouped.train(), loop.train()


def time_fwd_bwd(fn, x, repeats):
    times = []
    for i in range(repeats + 1):
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        y = fn(xi)
        (y[0] if isinstance(y, tuple) else y).square().mean().backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_bytes(rank, world, a, port, out):
    """One EP rank: the layer's forward and backward with torch.distributed's collectives counted."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sent = {"bytes": 0}
    real = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        sent["bytes"] += input.numel() * input.element_size()
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counted
    topo = Topology.build(ep=world, experts=True)
    layer = ours(a, topo)
    torch.manual_seed(10 + rank)
    x = torch.randn(1, a.tokens // world, a.hidden, requires_grad=True)
    sent["bytes"] = 0
    layer(x).square().mean().backward()
    with torch.no_grad():  # the minimum: every (token, expert) pair whose expert is elsewhere, both ways, twice
        experts, *_ = layer.router(x.reshape(-1, a.hidden), 1)
        local = a.experts // world
        remote = int(((experts // local) != rank).sum())
    out[rank] = (sent["bytes"], remote * a.hidden * 4 * 2 * 2, a.experts * 8)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1792)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {a.tokens} tokens, hidden {a.hidden}, expert FFN {a.ffn}, "
          f"{a.experts} experts, top-{a.topk}, fp32, forward + backward, median of {a.repeats}")
    layer = ours(a)
    grouped, loop = mixtral_blocks(a, layer)
    x = torch.randn(1, a.tokens, a.hidden)
    with torch.no_grad():
        y, y_grouped, y_loop = layer(x), grouped(x), loop(x)
    assert torch.allclose(y, y_grouped, atol=1e-5) and torch.allclose(y, y_loop, atol=1e-5), "outputs differ"
    t_ours = time_fwd_bwd(layer, x, a.repeats)
    t_grouped = time_fwd_bwd(grouped, x, a.repeats)
    t_loop = time_fwd_bwd(loop, x, a.repeats)
    print(f"(a) megalm MoE layer {1000 * t_ours:7.1f} ms | transformers Mixtral grouped_mm {1000 * t_grouped:7.1f} ms "
          f"(ratio {t_grouped / t_ours:.2f}x, target >= 1.0) | per-expert loop {1000 * t_loop:7.1f} ms (ratio "
          f"{t_loop / t_ours:.2f}x, target >= 1.5)")

    with torch.no_grad():  # the same tokens, sorted by expert once, outside the timed region
        experts, *_ = layer.router(x.reshape(-1, a.hidden), 1)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sorted_tokens = x.reshape(-1, a.hidden)[order // a.topk].contiguous()
        counts = torch.bincount(flat, minlength=a.experts)
    t_mm = time_fwd_bwd(lambda t: layer.experts(t, counts), sorted_tokens, a.repeats)
    print(f"(b) expert matmuls alone on sorted tokens {1000 * t_mm:7.1f} ms; the whole layer adds "
          f"{100 * (t_ours / t_mm - 1):.1f}% (target <= 25%)")

    port = 29000 + os.getpid() % 1000
    out = mp.Manager().dict()
    mp.spawn(count_bytes, args=(2, a, port, out), nprocs=2)
    sent, minimum, counts_bytes = (sum(out[r][i] for r in range(2)) for i in range(3))
    print(f"(c) EP 2, both ranks: {sent:,} bytes handed to all_to_all_single per step; minimum {minimum:,} + "
          f"counts {counts_bytes} = {minimum + counts_bytes:,}; ratio {sent / (minimum + counts_bytes):.3f} "
          f"(target 1.00)")


if __name__ == "__main__":
    main()
