"""megalm against megatron-core, the same GPT and Llama shapes, batch and layout, in one run: forward + backward +
optimizer step (Adam, weight decay 0.01, clipping at 1.0, fp32 on a CPU, bf16 on a GPU), median step time as
tokens/s, peak memory per rank, and the ratio megalm / megatron-core (each framework run ``--repeats`` times,
alternating, its fastest run and its smallest peak counted).

megatron-core is the installed package as its users build it: ``GPTModel`` with the local layer spec, its own
``DistributedDataParallel``, ``get_megatron_optimizer`` and ``get_forward_backward_func`` (1F1B under PP). On a
CPU it needs stand-ins for the calls that only exist on CUDA (``stand_ins``: they move device="cuda" tensors to
the CPU and replace a clipping helper that asserts CUDA types); nothing of its computation is changed. megalm is
its ``Trainer`` with the same hyperparameters. Each (framework, layout, shape) runs in processes of its own
under torchrun, so peak memory (the high-water resident set above what the process held before building the
model) is that framework's alone.

    python bench/bench_vs_megatron.py [--layouts 1 tp2 pp2] [--shapes gpt llama] [--iters 10] [--repeats 2]
    python bench/bench_vs_megatron.py --layouts tp2 --profile /tmp/prof   # where each one's time goes
"""
import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"1": (1, 1, 1), "tp2": (2, 2, 1), "pp2": (2, 1, 2)}  # name: (processes, TP, PP)
SHAPES = {  # one process per shape: layers, width, heads, query groups, FFN, sequence, vocabulary
    "gpt": dict(layers=4, hidden=256, heads=8, groups=8, ffn=1024, seq=256, vocab=4096, llama=False),
    "llama": dict(layers=4, hidden=256, heads=8, groups=4, ffn=688, seq=256, vocab=4096, llama=True),
}
MICRO, GLOBAL = 2, 8  # four micro-batches per step at DP 1
LR, WD, CLIP = 1e-4, 0.01, 1.0


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stand_ins():
    """What megatron-core calls on CUDA only, made to run on the CPU (see tests/megatron_peer.py for the three
    its forward needs); its model, DDP, optimizer and schedules are untouched."""
    from megatron.core import tensor_parallel, utils
    from megatron.core.optimizer import optimizer as mc_optimizer

    utils.GlobalMemoryBuffer.get_tensor = lambda self, shape, dtype, name, *a, **k: torch.empty(shape, dtype=dtype)
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"

    def on_cpu(factory):
        def make(*args, device=None, **kwargs):
            return factory(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)
        return make

    for name in ("tensor", "zeros", "ones", "empty", "full", "arange"):
        setattr(torch, name, on_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *a, **k: self

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        grads = [p.grad.detach() for p in parameters if p.grad is not None]  # its CUDA-typed assert left out
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0:
            torch._foreach_mul_(grads, coeff)

    mc_optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def batches(shape, iters, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, shape["vocab"] - 1, (MICRO, shape["seq"] + 1), generator=g)
             for _ in range(GLOBAL // MICRO)] for _ in range(iters)]


def timed(step, data, profile=None):
    """Each step's seconds; with ``profile`` (a path) the last two steps also run under torch.profiler and the
    operators that took the most time are written there."""
    times = []
    for i, micro in enumerate(data):
        profiling = profile and i >= len(data) - 2
        with torch.profiler.profile() if profiling else contextlib.nullcontext() as prof:
            start = time.perf_counter()
            step(micro)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if profiling:
            with open(f"{profile}.step{i}", "w") as fh:
                fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    return times


def run_megatron(shape, tp, pp, iters, bf16, profile=None):
    if not torch.cuda.is_available():
        stand_ins()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(tp, pp)
    llama, dtype = shape["llama"], torch.bfloat16 if bf16 else torch.float32
    norm = "RMSNorm" if llama else "LayerNorm"
    config = TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], ffn_hidden_size=shape["ffn"],
        num_attention_heads=shape["heads"], num_query_groups=shape["groups"], use_cpu_initialization=True,
        normalization=norm, gated_linear_unit=llama, activation_func=F.silu if llama else F.gelu,
        add_bias_linear=not llama, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=bf16)
    base = rss_mb()
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization=norm),
                     vocab_size=shape["vocab"], max_sequence_length=shape["seq"],
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=not llama,
                     position_embedding_type="rope" if llama else "learned_absolute")
    if torch.cuda.is_available():
        model.cuda()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=LR, weight_decay=WD, clip_grad=CLIP,
                                                       bf16=bf16), [ddp])
    forward_backward = get_forward_backward_func()
    s = shape["seq"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)[None, None]
    positions = torch.arange(s, device=device)[None]

    def forward_step(data, model):
        tokens = next(data).to(device)
        out = model(tokens[:, :-1], positions, attention_mask=mask, labels=tokens[:, 1:])
        return out, lambda per_token: (per_token.float().mean(), {})

    def step(micro):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=forward_step, data_iterator=iter(micro), model=[ddp],
                         num_microbatches=len(micro), seq_length=s, micro_batch_size=MICRO, forward_only=False)
        ddp.finish_grad_sync()
        optimizer.step()

    return timed(step, batches(shape, iters), profile), base


def run_megalm(shape, tp, pp, iters, bf16, workdir, profile=None):
    sys.path.insert(0, ROOT)
    from megalm.config import load_config
    from megalm.parallel.state import Topology
    from megalm.training.trainer import Trainer
    from bench_mfu import random_dataset

    prefix = os.path.join(workdir, "random_text_document")
    if dist.get_rank() == 0:  # one dataset for every rank (its sample index is built once, as in a real run)
        random_dataset(workdir, shape["vocab"], (iters + 2) * GLOBAL * (shape["seq"] + 1) + 10 * shape["seq"])
    dist.barrier()
    llama = ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
             "--untie-embeddings-and-output-weights"] if shape["llama"] else []
    flags = ["--num-layers", shape["layers"], "--hidden-size", shape["hidden"], "--num-attention-heads",
             shape["heads"], "--num-query-groups", shape["groups"], "--ffn-hidden-size", shape["ffn"],
             "--seq-length", shape["seq"], "--micro-batch-size", MICRO, "--global-batch-size", GLOBAL,
             "--train-iters", iters, "--eval-iters", "0", "--split", "100,0,0", "--data-path", prefix,
             "--tokenizer-type", "NullTokenizer", "--vocab-size", shape["vocab"] - 1, "--lr", LR,
             "--weight-decay", WD, "--clip-grad", CLIP, "--log-interval", "1000", "--tensor-model-parallel-size", tp,
             "--pipeline-model-parallel-size", pp, *llama, *(["--bf16"] if bf16 else [])]
    cfg = load_config([str(f) for f in flags], world_size=dist.get_world_size())
    topo = Topology.build(tp=tp, pp=pp)  # process groups before the baseline, as megatron-core's are
    base = rss_mb()
    trainer = Trainer(cfg, topo)
    data = [trainer._micro_batches(trainer.train_ds, i * GLOBAL) for i in range(iters)]
    return timed(trainer.train_step, data, profile), base


def warm_up():
    """The libraries' own first-use memory taken before either framework's baseline, so that the peak above the
    baseline is the framework's: BLAS and RNG state, and torch's meta-device kernels (a module built on the meta
    device imports torch's Python decompositions, ~70 MB, which megatron-core's imports already hold)."""
    x = torch.empty(512, 512).normal_(generator=torch.Generator().manual_seed(0))
    (x @ x).softmax(-1).sum().item()
    torch.nn.Embedding(8, 8, device="meta")


def worker(args):
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    warm_up()
    shape = SHAPES[args.shape]
    _, tp, pp = LAYOUTS[args.layout]
    bf16 = torch.cuda.is_available()
    profile = args.profile if args.profile and dist.get_rank() == 0 else None
    if args.worker == "megatron-core":
        times, base = run_megatron(shape, tp, pp, args.iters, bf16, profile)
    else:
        times, base = run_megalm(shape, tp, pp, args.iters, bf16, args.workdir, profile)
    steady = statistics.median(times[len(times) // 3:])
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else peak_mb() - base
    row = torch.tensor([steady, peak], dtype=torch.float64)
    dist.all_reduce(row, op=dist.ReduceOp.MAX)  # the slowest rank's step, the largest rank's memory
    if dist.get_rank() == 0:
        with open(args.out, "w") as fh:
            json.dump({"tokens_per_sec": GLOBAL * shape["seq"] / float(row[0]), "peak_mb": float(row[1])}, fh)
    dist.barrier()  # gloo can abort at shutdown without it
    dist.destroy_process_group()


def launch(framework, layout, shape, iters, profile=None):
    nproc = LAYOUTS[layout][0]
    with tempfile.TemporaryDirectory() as workdir:
        out = os.path.join(workdir, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               os.path.abspath(__file__), "--worker", framework, "--layout", layout, "--shape", shape,
               "--iters", str(iters), "--out", out, "--workdir", workdir,
               *(["--profile", f"{profile}-{framework}-{shape}-{layout}"] if profile else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                             env=dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc))))
        if res.returncode != 0:
            raise SystemExit(f"{framework} {layout} {shape} failed:\n{res.stderr[-4000:]}")
        with open(out) as fh:
            return json.load(fh)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each framework, alternated; the best counts")
    ap.add_argument("--worker", choices=("megalm", "megatron-core"), help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--profile", help="write rank 0's operator profile of the last two steps to PROFILE-<framework>-"
                    "<shape>-<layout>.step<i> for each run")
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    import warnings

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed" on a CPU machine
        warnings.simplefilter("ignore")
        import megatron.core

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, {os.cpu_count()} cores"
    print(f"device: {device}; torch {torch.__version__}, megatron-core {megatron.core.__version__}; "
          f"{'bf16' if torch.cuda.is_available() else 'fp32'}, micro batch {MICRO}, global batch {GLOBAL}, "
          f"median of steps {args.iters // 3 + 1}..{args.iters}")
    print(f"{'shape':<7}{'layout':<8}{'megalm tok/s':>14}{'mcore tok/s':>13}{'ratio':>8}"
          f"{'megalm MB':>11}{'mcore MB':>10}{'ratio':>8}")
    worst = None
    for shape in args.shapes:
        for layout in args.layouts:
            runs = {"megalm": [], "megatron-core": []}
            for _ in range(args.repeats):  # alternated, so that a slow spell of the machine hits both
                for framework in runs:
                    runs[framework].append(launch(framework, layout, shape, args.iters, args.profile))
            ours, ref = ({"tokens_per_sec": max(r["tokens_per_sec"] for r in rs),
                          "peak_mb": min(r["peak_mb"] for r in rs)} for rs in runs.values())
            speed, memory = ours["tokens_per_sec"] / ref["tokens_per_sec"], ours["peak_mb"] / ref["peak_mb"]
            worst = speed if worst is None else min(worst, speed)
            print(f"{shape:<7}{layout:<8}{ours['tokens_per_sec']:>14,.0f}{ref['tokens_per_sec']:>13,.0f}"
                  f"{speed:>7.2f}x{ours['peak_mb']:>11,.0f}{ref['peak_mb']:>10,.0f}{memory:>7.2f}x", flush=True)
    print(f"slowest ratio megalm / megatron-core: {worst:.2f}x (target >= 1.0 at every layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
