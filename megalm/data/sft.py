"""Supervised fine-tuning data: JSON lines in the common shapes (``--sft-format``), tokenized with the model's chat
template where they hold conversations, the loss on what the assistant writes, packed without padding between
examples.

Shapes (``auto`` tells them apart line by line):

- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (optional ``tools`` and ``chat_template_kwargs``),
  rendered by the chat template (``megalm.data.chat_template``): ids equal transformers' ``apply_chat_template``,
  the loss on the assistant's tokens;
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}``, the same once its roles
  are renamed;
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?}``: one user turn (instruction, then the input after a
  blank line) and the answer, through the chat template; without one, the Alpaca prompt of its authors;
- ``prompt-response``: ``{"prompt", "response"}`` (or ``completion``) as plain text, the response ended by the end of
  document; the response starts where the tokens of the prompt and of prompt + response part (as TRL does, so a
  token that merges across the boundary belongs to the response).

Packing: examples (cut to ``seq_length + 1`` tokens) go into samples of ``seq_length + 1`` tokens by best-fit
decreasing, so padding is only what no example fits into, at the end of a sample. Each example is its own document:
positions restart at its first token and attention stays inside it; a document's first token is never a target.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from typing import List, Optional, Tuple

import numpy as np

from megalm.data.chat_template import ChatTemplateError
from megalm.data.gpt_dataset import DatasetError
from megalm.data.jsonl import JsonlError, check_text, has_surrogate_escape, iter_lines, parse_object

log = logging.getLogger("megalm")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "system": "system", "tool": "tool", "observation": "tool",
                  "function_call": "assistant"}
ALPACA = {True: ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n### Instruction:\n{}\n\n"
                 "### Input:\n{}\n\n### Response:\n"),
          False: ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                  "request.\n\n### Instruction:\n{}\n\n### Response:\n")}
KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
        "prompt-response": ("prompt",)}


def shape_of(example: dict, fmt: str, where: str) -> str:
    """The shape of one line: ``fmt`` itself, checked, or under ``auto`` the one its keys say."""
    if fmt == "auto":
        for shape, keys in KEYS.items():
            if all(k in example for k in keys):
                return shape
        raise DatasetError(f"{where}: not an example of any --sft-format (expected 'messages', 'conversations', "
                           f"'instruction' and 'output', or 'prompt' and 'response'; keys here: "
                           f"{', '.join(list(example)[:8])})")
    missing = [k for k in KEYS[fmt] if k not in example]
    if missing:
        raise DatasetError(f"{where}: no {', '.join(map(repr, missing))} (--sft-format {fmt})")
    return fmt


def _text(value, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def conversation(example: dict, shape: str, where: str) -> Optional[List[dict]]:
    """The example's messages (None for plain text: ``prompt-response``, and ``alpaca`` without a template)."""
    if shape == "messages":
        messages = example["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                     for m in messages):
            raise DatasetError(f"{where}: 'messages' must be a list of objects, each with a 'role'")
        return messages
    if shape == "sharegpt":
        turns = example["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise DatasetError(f"{where}: 'conversations' must be a list of objects")
        messages = [{"role": "system", "content": example["system"]}] if example.get("system") else []
        for turn in turns:
            role = SHAREGPT_ROLES.get(turn.get("from"))
            if role is None:
                raise DatasetError(f"{where}: unknown speaker {turn.get('from')!r} (known: "
                                   f"{', '.join(SHAREGPT_ROLES)})")
            messages.append({"role": role, "content": _text(turn.get("value"), "a turn's 'value'", where)})
        return messages
    instruction, extra = _text(example["instruction"], "'instruction'", where), example.get("input") or ""
    messages = [{"role": "system", "content": example["system"]}] if example.get("system") else []
    return messages + [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
                       {"role": "assistant", "content": _text(example["output"], "'output'", where)}]


def shared_prefix(a, b) -> int:
    """How many items (ids, characters, messages) ``a`` and ``b`` share from the start: where a completion
    begins, since the prompt's own ids can stop being a prefix of prompt + completion's (a token may merge across
    the boundary)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def completion_split(tokenizer, prompt: str, completion: str) -> Tuple[List[int], int]:
    """Plain text: the ids of ``prompt + completion`` then the end of document, and where the completion starts."""
    full = tokenizer.tokenize(prompt + completion) + [tokenizer.eod]
    return full, shared_prefix(tokenizer.tokenize(prompt), full)


def tokenize_example(example: dict, shape: str, tokenizer, template, where: str) -> Tuple[np.ndarray, np.ndarray]:
    """(ids, 0/1 targets) of one example."""
    messages = conversation(example, shape, where) if shape != "prompt-response" else None
    if shape == "alpaca" and template is None:
        instruction, extra = example["instruction"], example.get("input") or ""
        prompt = ALPACA[bool(extra)].format(instruction, extra)
        messages, example = None, {"prompt": prompt, "response": example["output"]}
    if messages is None:
        response = example.get("response", example.get("completion"))
        if response is None:
            raise DatasetError(f"{where}: a prompt needs a 'response' (or 'completion')")
        ids, start = completion_split(tokenizer, _text(example["prompt"], "'prompt'", where),
                                      _text(response, "'response'", where))
        return np.asarray(ids, dtype=np.int64), (np.arange(len(ids)) >= start).astype(np.uint8)
    if not any(m.get("role") == "assistant" for m in messages):
        raise DatasetError(f"{where}: the conversation has no assistant turn to learn from")
    if template is None:
        raise DatasetError(f"{where}: a conversation needs a chat template; the tokenizer has none "
                           f"(give --chat-template FILE.jinja or a tokenizer directory with one)")
    kwargs = example.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise DatasetError(f"{where}: 'chat_template_kwargs' must be an object")
    try:
        ids, mask = template.encode(messages, tools=example.get("tools"), **kwargs)
    except ChatTemplateError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def read_examples(path: str, parse, shard: int = 0, shards: int = 1) -> list:
    """``(line, parse(example, where))`` of every non-blank line (with ``shards``: of the lines whose number is
    ``shard`` modulo ``shards``, one rank's share), errors naming ``path:line``."""
    out = []
    try:
        for _, lineno, line in iter_lines([path]):
            if lineno % shards != shard:
                continue
            where = f"{path}:{lineno}"
            example = parse_object(line, where)
            if example is None:
                continue
            if has_surrogate_escape(line):
                _check_strings(example, where)
            out.append((lineno, parse(example, where)))
    except JsonlError as exc:
        raise DatasetError(str(exc)) from None
    if not out and shards == 1:
        raise DatasetError(f"{path}: no examples")
    return out


def _check_strings(value, where: str) -> None:
    """Every string of a parsed line is text (a lone surrogate escape is not; no tokenizer can encode it)."""
    if isinstance(value, str):
        check_text(value, "the example", where)
    elif isinstance(value, dict):
        for v in value.values():
            _check_strings(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, where)


def example_parser(tokenizer, fmt: str = "auto", template=None):
    """``parse(example, where) -> (ids, targets)`` of one SFT line; ``template``: the chat template (None: plain
    text only)."""
    return lambda ex, where: tokenize_example(ex, shape_of(ex, fmt, where), tokenizer, template, where)


def tokenize_examples(path: str, tokenizer, fmt: str = "auto", template=None) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Every example of an SFT file as (ids, targets)."""
    return [example for _, example in read_examples(path, example_parser(tokenizer, fmt, template))]


class _FreeSpace:
    """Open samples by their free space (0..size), the smallest free space of at least ``n`` found in log time
    (a tree of counts over the spaces): best fit."""

    def __init__(self, size: int):
        self.leaves = 1
        while self.leaves < size + 1:
            self.leaves *= 2
        self.count = [0] * (2 * self.leaves)
        self.bins = [[] for _ in range(self.leaves)]

    def _add(self, space: int, delta: int) -> None:
        i = space + self.leaves
        while i:
            self.count[i] += delta
            i //= 2

    def push(self, space: int, sample: int) -> None:
        self.bins[space].append(sample)
        self._add(space, 1)

    def pop_at_least(self, n: int) -> Optional[Tuple[int, int]]:
        """(free space, sample) of an open sample with the least free space >= n, taken out; or None."""
        space = self._first(1, 0, self.leaves - 1, n)
        if space is None:
            return None
        self._add(space, -1)
        return space, self.bins[space].pop()

    def _first(self, node: int, lo: int, hi: int, n: int) -> Optional[int]:
        if hi < n or not self.count[node]:
            return None
        if lo == hi:
            return lo
        mid = (lo + hi) // 2
        left = self._first(2 * node, lo, mid, n)
        return left if left is not None else self._first(2 * node + 1, mid + 1, hi, n)


def pack(examples, seq_length: int, where: str = "") -> dict:
    """Best-fit-decreasing packing into samples of ``seq_length + 1`` tokens: ``ids`` (int32), ``targets`` (uint8,
    whether each token is predicted) and ``docs`` (int32, the example of each token; padding a document of its
    own), each ``[n, seq_length + 1]``. Longer examples are cut (counted in the log); one with no target left is
    dropped."""
    size, cut, dropped = seq_length + 1, 0, 0
    kept = []
    for ids, targets in examples:
        if len(ids) > size:
            cut += 1
            ids, targets = ids[:size], targets[:size]
        targets = targets.copy()
        targets[0] = 0  # nothing in its own document predicts a document's first token
        if not targets.any():
            dropped += 1
            continue
        kept.append((ids, targets))
    if cut or dropped:
        log.warning("%s: %d example(s) longer than --seq-length + 1 (%d tokens) were cut%s", where or "SFT data", cut,
                    size, f"; {dropped} with nothing left to learn were dropped" if dropped else "")
    if not kept:
        raise DatasetError(f"{where}: no example has a token to learn within --seq-length {seq_length}")
    order = sorted(range(len(kept)), key=lambda i: (-len(kept[i][0]), i))
    free, contents = _FreeSpace(size), []
    for i in order:
        n = len(kept[i][0])
        found = free.pop_at_least(n)
        if found is None:
            contents.append([i])
            space = size - n
            sample = len(contents) - 1
        else:
            space, sample = found
            contents[sample].append(i)
            space -= n
        free.push(space, sample)
    out = {"ids": np.zeros((len(contents), size), dtype=np.int32),
           "targets": np.zeros((len(contents), size), dtype=np.uint8),
           "docs": np.zeros((len(contents), size), dtype=np.int32)}
    for s, members in enumerate(contents):
        at = 0
        for doc, i in enumerate(members):
            ids, targets = kept[i]
            out["ids"][s, at:at + len(ids)] = ids
            out["targets"][s, at:at + len(ids)] = targets
            out["docs"][s, at:at + len(ids)] = doc
            at += len(ids)
        out["docs"][s, at:] = len(members)
    used = sum(len(ids) for ids, _ in kept)
    log.info("%s: %d examples packed into %d samples of %d tokens (%.1f%% of the tokens are padding)",
             where or "SFT data", len(kept), len(contents), size, 100.0 * (1 - used / (len(contents) * size)))
    return out


class PackedDataset:
    """Packed samples (``pack``'s arrays), reshuffled every epoch (deterministic in ``seed``), indexable without
    bound; an item is a dict of one sample's rows and its ``index`` in the arrays."""

    def __init__(self, arrays: dict, seed: int):
        self.arrays, self.seed = arrays, seed
        self._orders = {}

    def __len__(self) -> int:
        return len(self.arrays["ids"])

    def sample(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.arrays.items()}, "index": i}

    def __getitem__(self, idx: int) -> dict:
        epoch, i = divmod(idx, len(self))
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng(self.seed + epoch).permutation(len(self))
        return self.sample(int(self._orders[epoch][i]))

    @functools.cached_property
    def fingerprint(self) -> str:
        """A digest of the samples (what per-sample values computed from them, like DPO's reference, are for),
        computed once: every checkpoint of a DPO run records it."""
        h = hashlib.sha256()
        for key in sorted(self.arrays):
            h.update(key.encode())
            h.update(np.ascontiguousarray(self.arrays[key]).tobytes())
        return h.hexdigest()[:24]


def split_examples(examples: list, split: List[float]) -> tuple:
    """(train, valid) lists, valid the last ``--split``'s second share (None when that share is 0)."""
    n_valid = int(round(len(examples) * split[1])) if split[1] > 0 else 0
    n_valid = min(max(n_valid, 1 if split[1] > 0 else 0), len(examples) - 1)
    return examples[: len(examples) - n_valid], (examples[len(examples) - n_valid:] if n_valid else None)


def pack_splits(examples: list, seq_length: int, split: List[float], where: str) -> dict:
    """``{"train": arrays, "valid": arrays}`` (valid only when ``--split`` gives it a share) of packed examples."""
    train, valid = split_examples(examples, split)
    out = {"train": pack(train, seq_length, where)}
    if valid:
        out["valid"] = pack(valid, seq_length, where + " (validation)")
    return out
