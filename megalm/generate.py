"""Text generation from a megalm checkpoint: batches of prompts, greedy, temperature, top-k and top-p sampling,
stop tokens, a preallocated KV cache, and an optional local HTTP endpoint.

``python -m megalm.generate --load CKPT --prompt "..." [--prompt ...]``; under ``torchrun`` with
``--tensor-model-parallel-size N`` and/or ``--pipeline-model-parallel-size P`` each rank holds its shard of its
stage's layers (any layout: checkpoints reshard on load), and every rank ends with the same tokens.
``--serve`` answers ``POST /generate`` on 127.0.0.1 (``--host``/``--port`` to change).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

import torch
import torch.distributed as dist

from megalm.data.tokenizers import TokenizerError, build_tokenizer
from megalm.model.gpt import GPT
from megalm.model.transformer import KVCache
from megalm.pipeline.inference import from_last_stage, last_position_logits
from megalm.pipeline.layout import stage_chunks
from megalm.parallel.state import LayoutError, Topology, destroy_distributed, init_distributed, launch_environment
from megalm.training.checkpoint import CheckpointError, load_model_state
from megalm.training.finetune import read_whole_model
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
def generate_batch(model: GPT, prompts: List[List[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, stop_ids=(), use_cache: bool = True, seed: int = 0,
                   pad_id: int = 0) -> List[List[int]]:
    """Each prompt followed by up to ``max_new_tokens`` generated ids (a sequence stops after any of
    ``stop_ids``). Prompts of different lengths are left-padded into one batch; padding is masked out and
    positions start at each prompt's first token, so every sequence comes out as it would alone."""
    model.eval()
    device = next(model.parameters()).device
    if not prompts or any(not p for p in prompts):
        raise ValueError("empty prompt: give at least one token")
    longest = max(len(p) for p in prompts)
    if model.cfg.position_embedding_type == "learned_absolute":
        limit = model.cfg.max_position_embeddings
        if longest > limit:
            raise ValueError(f"prompt of {longest} tokens is longer than the model's {limit} positions")
        max_new_tokens = min(max_new_tokens, limit - longest)
    total = longest + max_new_tokens
    tokens = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    valid = torch.ones(len(prompts), total, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):] = torch.tensor(p, device=device)
        valid[i, : longest - len(p)] = False
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    padded = not bool(valid.all())
    generator = torch.Generator(device=device).manual_seed(seed)
    outputs = [list(p) for p in prompts]
    done = [False] * len(prompts)
    cache = KVCache(total, valid if padded else None)
    step_tokens, step_pos = tokens, positions[:, :longest]
    for t in range(max_new_tokens):
        if not use_cache:  # recompute everything: a fresh cache that only holds this step
            cache = KVCache(0, valid if padded else None)
        logits = last_position_logits(model, step_tokens, step_pos, cache)
        nxt = None if logits is None else sample_next(logits, temperature, top_k, top_p, generator)
        nxt = from_last_stage(nxt, step_tokens[:, -1], model.topo)
        for i, token in enumerate(nxt.tolist()):
            if not done[i]:
                outputs[i].append(token)
                done[i] = token in stop_ids
        if all(done):
            break
        if use_cache:
            step_tokens, step_pos = nxt[:, None], positions[:, longest + t: longest + t + 1]
        else:
            step_tokens = torch.cat((step_tokens, nxt[:, None]), dim=1)
            step_pos = positions[:, : step_tokens.shape[1]]
    return outputs


def generate(model: GPT, prompt: List[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids=(), use_cache: bool = True, seed: int = 0) -> List[int]:
    """One prompt: ``generate_batch`` of one."""
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, stop_ids, use_cache, seed)[0]


def load_for_inference(path: str, topo: Topology, overrides: dict):
    """Model (weights loaded, eval mode) and tokenizer of a checkpoint (of LoRA adapters: merged into their base);
    tokenizer paths can be overridden."""
    state = read_whole_model(path)
    cfg = state["config"]
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.data, key, value)
    tokenizer = build_tokenizer(cfg.data)
    if cfg.model.num_layers % topo.pp:
        raise LayoutError(f"--pipeline-model-parallel-size {topo.pp} does not divide the checkpoint's "
                          f"{cfg.model.num_layers} layers")
    if topo.ep > 1 and (not cfg.model.num_experts or cfg.model.num_experts % topo.ep):
        raise LayoutError(f"--expert-model-parallel-size {topo.ep} needs an MoE checkpoint whose experts "
                          f"({cfg.model.num_experts or 0}) it divides")
    model = GPT(cfg.model, tokenizer.vocab_size, topo, stage_chunks(cfg.model.num_layers, topo.pp, topo.pp_rank))
    load_model_state(model, state["model"], topo, state["path"])
    if torch.cuda.is_available():
        model.cuda()
    return model.eval(), tokenizer


class RequestError(ValueError):
    """A request the endpoint refuses; ``status`` is the HTTP answer (400, or 413 for a body over the limit)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


OPTION_TYPES = {"max_new_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}


class Generator:
    """What the command line and the HTTP endpoint share. ``prepare`` (rank 0) checks a request and tokenizes it;
    ``run`` (every rank alike) generates from the prepared ids; ``__call__`` is both, for the command line."""

    def __init__(self, model, tokenizer, args):
        self.model, self.tok, self.args = model, tokenizer, args

    def prepare(self, prompts, options: dict) -> dict:
        """Token ids and checked options, or a RequestError that names what is wrong."""
        a = self.args
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError('"prompts" must be a non-empty list of strings')
        if len(prompts) > a.max_prompts:
            raise RequestError(f"{len(prompts)} prompts, more than --max-prompts {a.max_prompts}")
        unknown = sorted(set(options) - set(OPTION_TYPES))
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(unknown)} (known: prompts, {', '.join(OPTION_TYPES)})")
        opts = {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k,
                "top_p": a.top_p, "seed": a.seed}
        for key, value in options.items():
            kind = OPTION_TYPES[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise RequestError(f'"{key}" must be a{"n integer" if kind is int else " number"}, not {value!r}')
            opts[key] = kind(value)
        if not 0 <= opts["max_new_tokens"] <= a.max_new_tokens_limit:
            raise RequestError(f'"max_new_tokens" {opts["max_new_tokens"]} is outside 0..--max-new-tokens-limit '
                               f"{a.max_new_tokens_limit}")
        if not 0 < opts["top_p"] <= 1 or opts["top_k"] < 0 or opts["temperature"] < 0:
            raise RequestError('need 0 < "top_p" <= 1, "top_k" >= 0, "temperature" >= 0')
        ids = [self.tok.tokenize(p) for p in prompts]
        if any(not i for i in ids):
            raise RequestError("empty prompt: give at least one token")
        if self.model.cfg.position_embedding_type == "learned_absolute":
            limit = self.model.cfg.max_position_embeddings
            if max(len(i) for i in ids) > limit:
                raise RequestError(f"prompt of {max(len(i) for i in ids)} tokens is longer than the model's "
                                   f"{limit} positions")
        return {"ids": ids, **opts}

    def run(self, request: dict) -> List[List[int]]:
        """The generated ids (prompt excluded) of a prepared request; every rank calls this alike."""
        a = self.args
        stop = () if a.no_stop_at_eod else (self.tok.eod,)
        ids, size, out = request["ids"], a.batch_size or len(request["ids"]), []
        for start in range(0, len(ids), size):
            batch = ids[start: start + size]
            outs = generate_batch(self.model, batch, request["max_new_tokens"], request["temperature"],
                                  request["top_k"], request["top_p"], stop, not a.no_kv_cache, request["seed"],
                                  pad_id=self.tok.eod)
            out += [o[len(p):] for p, o in zip(batch, outs)]
        return out

    def __call__(self, prompts: List[str], **options) -> List[str]:
        return [self.tok.detokenize(o) for o in self.run(self.prepare(prompts, options))]


def serve(gen: Generator, host: str, port: int, topo: Topology) -> None:
    """POST /generate {"prompts": [...], "max_new_tokens": ..., "temperature": ...} -> {"texts": [...]}.
    Rank 0 listens, checks and tokenizes each request, and broadcasts only a valid one, so that every rank runs
    the same forward passes and a bad request never reaches the others: they keep serving."""
    import json
    from http.server import BaseHTTPRequestHandler, HTTPServer

    def broadcast(request):
        if topo.world_size > 1:
            box = [request]
            dist.broadcast_object_list(box, src=0)
            request = box[0]
        return request

    if topo.rank != 0:
        while (request := broadcast(None)) is not None:
            try:
                gen.run(request)
            except ValueError as exc:  # rank 0 meets the same error on the same request and answers it
                log.warning("request failed: %s", exc)
        return

    limit = gen.args.max_request_bytes

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                if self.path != "/generate":
                    raise RequestError(f"no endpoint {self.path}: POST /generate", 404)
                try:
                    length = int(self.headers.get("Content-Length", 0))
                except ValueError:
                    raise RequestError("bad Content-Length") from None
                if length > limit:
                    raise RequestError(f"request body of {length} bytes is over --max-request-bytes {limit}", 413)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(f"body is not JSON: {exc}") from None
                if not isinstance(body, dict):
                    raise RequestError('body must be a JSON object {"prompts": [...]}')
                request = gen.prepare(body.get("prompts"), {k: v for k, v in body.items() if k != "prompts"})
                try:
                    texts = [gen.tok.detokenize(o) for o in gen.run(broadcast(request))]
                except ValueError as exc:
                    raise RequestError(str(exc)) from None
                reply, code = {"texts": texts}, 200
            except RequestError as exc:
                reply, code = {"error": str(exc)}, exc.status
            except TokenizerError as exc:
                reply, code = {"error": str(exc)}, 400
            data = json.dumps(reply).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if code == 413:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            log.info("http: " + fmt, *args)

    server = HTTPServer((host, port), Handler)
    log.info("serving on http://%s:%d/generate", host, server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        broadcast(None)  # release the other ranks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megalm-generate", description="Generate text from a megalm checkpoint.")
    p.add_argument("--load", required=True, help="checkpoint directory (a --save root or an iter_* directory)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for several")
    p.add_argument("--batch-size", type=int, default=0, help="prompts per forward batch (default: all at once)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--no-stop-at-eod", action="store_true", help="keep going past the end-of-document token")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="MoE checkpoints: ranks that split each layer's experts")
    p.add_argument("--serve", action="store_true", help="answer POST /generate over HTTP instead of --prompt")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on with --serve (default: local only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="with --serve: larger bodies get 413")
    p.add_argument("--max-prompts", type=int, default=64, help="prompts per request (or per --prompt run)")
    p.add_argument("--max-new-tokens-limit", type=int, default=4096,
                   help="with --serve: the largest max_new_tokens a request may ask for")
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--tokenizer-model")
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1 or args.top_k < 0 or args.temperature < 0 or args.max_new_tokens < 0:
        p.error("need 0 < --top-p <= 1, --top-k >= 0, --temperature >= 0, --max-new-tokens >= 0")
    if args.max_new_tokens > args.max_new_tokens_limit:
        p.error(f"--max-new-tokens {args.max_new_tokens} is over --max-new-tokens-limit {args.max_new_tokens_limit}")
    if len(args.prompt) > args.max_prompts:
        p.error(f"{len(args.prompt)} prompts, more than --max-prompts {args.max_prompts}")
    if not args.prompt and not args.serve:
        p.error("give --prompt (one or more) or --serve")
    setup_logging(launch_environment()["rank"])
    init_distributed()
    try:
        ep = args.expert_model_parallel_size
        topo = Topology.build(args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size, ep=ep,
                              experts=ep > 1)
        model, tok = load_for_inference(args.load, topo, {"vocab_file": args.vocab_file,
                                                          "merge_file": args.merge_file,
                                                          "tokenizer_model": args.tokenizer_model})
        gen = Generator(model, tok, args)
        if args.serve:
            serve(gen, args.host, args.port, topo)
        else:
            for prompt, text in zip(args.prompt, gen(args.prompt)):
                if topo.rank == 0:
                    print(f"--- prompt: {prompt!r}\n{prompt}{text}\n", flush=True)
    except (CheckpointError, TokenizerError, LayoutError, ValueError, FileNotFoundError) as exc:
        print(f"megalm-generate: error: {exc}", file=sys.stderr)
        destroy_distributed(barrier=False)
        return 2
    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
