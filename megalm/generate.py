"""Text generation from a megalm checkpoint: greedy, temperature, top-k and top-p sampling with a KV cache.

``python -m megalm.generate --load CKPT --prompt "..."``; under ``torchrun`` with
``--tensor-model-parallel-size N`` each rank holds a shard and every rank draws the same tokens.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

import torch

from megalm.data.tokenizers import TokenizerError, build_tokenizer
from megalm.model.gpt import GPT
from megalm.model.transformer import KVCache
from megalm.parallel.state import LayoutError, Topology, destroy_distributed, init_distributed, launch_environment
from megalm.training.checkpoint import CheckpointError, load_model_state, read_checkpoint
from megalm.training.logging import setup_logging

log = logging.getLogger("megalm")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids ``[b]`` from last-position logits ``[b, vocab]``; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, prompt: List[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids=(), use_cache: bool = True, seed: int = 0) -> List[int]:
    """Prompt followed by up to ``max_new_tokens`` generated ids (stopping after any of ``stop_ids``)."""
    model.eval()
    device = next(model.parameters()).device
    limit = model.cfg.max_position_embeddings if model.cfg.position_embedding_type == "learned_absolute" else None
    if not prompt:
        raise ValueError("empty prompt: give at least one token")
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - len(prompt))
        if max_new_tokens < 0:
            raise ValueError(f"prompt of {len(prompt)} tokens is longer than the model's {limit} positions")
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt)
    cache = KVCache() if use_cache else None
    step_input = torch.tensor([ids], device=device)
    for _ in range(max_new_tokens):
        logits = model(step_input, kv_cache=cache)[:, -1]
        nxt = int(sample_next(logits, temperature, top_k, top_p, generator))
        ids.append(nxt)
        if nxt in stop_ids:
            break
        step_input = torch.tensor([[nxt]] if use_cache else [ids], device=device)
    return ids


def load_for_inference(path: str, topo: Topology, overrides: dict):
    """Model (weights loaded, eval mode) and tokenizer of a checkpoint; tokenizer paths can be overridden."""
    state = read_checkpoint(path, parts=("model",))
    cfg = state["config"]
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.data, key, value)
    tokenizer = build_tokenizer(cfg.data)
    model = GPT(cfg.model, tokenizer.vocab_size, topo)
    load_model_state(model, state["model"], topo, state["path"])
    if torch.cuda.is_available():
        model.cuda()
    return model.eval(), tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megalm-generate", description="Generate text from a megalm checkpoint.")
    p.add_argument("--load", required=True, help="checkpoint directory (a --save root or an iter_* directory)")
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--no-stop-at-eod", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--tokenizer-model")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1 or args.top_k < 0 or args.temperature < 0 or args.max_new_tokens < 0:
        p.error("need 0 < --top-p <= 1, --top-k >= 0, --temperature >= 0, --max-new-tokens >= 0")
    setup_logging(launch_environment()["rank"])
    init_distributed()
    try:
        topo = Topology.build(args.tensor_model_parallel_size)
        model, tok = load_for_inference(args.load, topo, {"vocab_file": args.vocab_file,
                                                          "merge_file": args.merge_file,
                                                          "tokenizer_model": args.tokenizer_model})
        stop = () if args.no_stop_at_eod else (tok.eod,)
        for prompt in args.prompt:
            ids = tok.tokenize(prompt)
            out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, stop,
                           not args.no_kv_cache, args.seed)
            if topo.rank == 0:
                print(f"--- prompt: {prompt!r}\n{prompt}{tok.detokenize(out[len(ids):])}\n", flush=True)
    except (CheckpointError, TokenizerError, LayoutError, ValueError, FileNotFoundError) as exc:
        print(f"megalm-generate: error: {exc}", file=sys.stderr)
        destroy_distributed(barrier=False)
        return 2
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
