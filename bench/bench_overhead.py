"""megalm's Trainer at TP = DP = 1 against a minimal plain PyTorch loop: same model shape, same batches, same
optimizer settings, in one run; prints tokens/s of both and the ratio (target: megalm >= 0.95x).

The plain loop is written here from scratch (a nanoGPT-style GPT and torch's AdamW) and gets its batches
pre-built, so its data loading costs nothing; megalm's time includes reading its dataset.

python bench/bench_overhead.py [--iters 40] [--threads 2] [--reference plain|transformers]
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm.config import load_config  # noqa: E402
from megalm.data.loader import global_batch  # noqa: E402
from megalm.parallel.state import Topology  # noqa: E402
from megalm.tools.build_corpus import build_corpus  # noqa: E402
from megalm.tools.preprocess_data import build_parser, run  # noqa: E402
from megalm.tools.train_tokenizer import train_bpe  # noqa: E402
from megalm.training.trainer import Trainer  # noqa: E402


class PlainBlock(nn.Module):
    def __init__(self, h, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc, self.out = nn.Linear(h, 4 * h), nn.Linear(4 * h, h)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(h, dim=2)
        q, k, v = (t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    def __init__(self, vocab, h, layers, heads, seq):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, h), nn.Embedding(seq, h)
        self.blocks = nn.ModuleList(PlainBlock(h, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(h)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


class HFGPT2(nn.Module):
    """transformers' GPT-2 of the same shape, its loss on megalm's (already shifted) labels."""

    def __init__(self, vocab, h, layers, heads, seq):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=h, n_layer=layers,
                                                n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def forward(self, idx, targets):
        logits = self.model(input_ids=idx).logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def plain_loop(cfg, vocab, batches, reference="plain"):
    m, o = cfg.model, cfg.optim
    model = (HFGPT2 if reference == "transformers" else PlainGPT)(vocab, m.hidden_size, m.num_layers,
                                                                  m.num_attention_heads, m.seq_length)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0}],
                            lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), foreach=True)
    times = []
    for micro in batches:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        for mb in micro:
            (model(mb["tokens"], mb["labels"]) / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reference", default="plain", choices=("plain", "transformers"),
                   help="the nanoGPT-style loop, or transformers' GPT2LMHeadModel with torch AdamW")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="megalm-bench-")
    corpus = os.path.join(work, "corpus.jsonl")
    build_corpus(corpus, max_mb=2.0)
    train_bpe([corpus], ["text"], 8192, os.path.join(work, "tok"))
    tok = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(work, "tok", "vocab.json"),
           "--merge-file", os.path.join(work, "tok", "merges.txt")]
    run(build_parser().parse_args(["--input", corpus, "--output-prefix", os.path.join(work, "c"), "--append-eod",
                                   "--workers", "2", *tok]))
    metrics = os.path.join(work, "metrics.jsonl")
    cfg = load_config(["--config", "configs/gpt_tiny.yaml", "--data-path", os.path.join(work, "c_text_document"),
                       "--train-iters", str(args.iters), "--eval-iters", "0", "--log-interval", "1000",
                       "--metrics-file", metrics, "--timing-log-level", "1", *tok])
    trainer = Trainer(cfg, Topology())
    t = cfg.train
    batches = [global_batch(trainer.train_ds, i * t.global_batch_size, t.global_batch_size, t.micro_batch_size)
               for i in range(args.iters)]
    plain_before = plain_loop(cfg, trainer.tokenizer.vocab_size, batches, args.reference)
    trainer.train()
    plain_after = plain_loop(cfg, trainer.tokenizer.vocab_size, batches, args.reference)  # on both sides
    import json

    with open(metrics) as fh:
        rows = [r for r in map(json.loads, fh) if "ms_per_iter" in r]
    ours = [r["ms_per_iter"] / 1000 for r in rows]
    parts = {k[5:-3]: statistics.median(r[k] for r in rows[args.warmup:]) for k in rows[-1] if k.startswith("time_")}
    tokens = t.global_batch_size * cfg.model.seq_length
    ours_tps = tokens / statistics.median(ours[args.warmup:])
    plain_tps = max(tokens / statistics.median(run[args.warmup:]) for run in (plain_before, plain_after))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads")
    print(f"model: configs/gpt_tiny.yaml ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
          f"seq {cfg.model.seq_length}, vocab {trainer.tokenizer.vocab_size}), global batch {t.global_batch_size}, "
          f"micro batch {t.micro_batch_size}; median of iterations {args.warmup + 1}..{args.iters}")
    name = "transformers GPT-2 loop" if args.reference == "transformers" else "plain PyTorch loop"
    print(f"{name}: {plain_tps:8.0f} tokens/s (the better of a run before and one after megalm's)")
    print(f"megalm Trainer:     {ours_tps:8.0f} tokens/s")
    print("megalm step's parts (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
          + f"; whole step {1000 * statistics.median(ours[args.warmup:]):.1f}")
    print(f"ratio megalm / {args.reference}: {ours_tps / plain_tps:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
