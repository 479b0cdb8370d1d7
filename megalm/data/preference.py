"""Preference data for DPO: JSON lines of ``{"prompt", "chosen", "rejected"}``, as text or as messages (the prompt
a list of messages, each completion an assistant message, a list of them, or a string), or of ``{"chosen",
"rejected"}`` whole conversations whose shared beginning is the prompt (``messages`` is accepted for ``prompt``).

Tokenized as TRL's ``DPOTrainer`` does: conversations through the chat template (the prompt with its generation
prompt), text as it is with the end of document after each completion; a completion starts where the prompt's
own ids stop being a prefix of prompt + completion (tokens can merge across the boundary).

Each pair is one sample of ``seq_length + 1`` tokens: ``prompt + chosen`` (document 0) then ``prompt + rejected``
(document 1), attention and positions within each, the targets on the completions' tokens; the rest is padding
(document 2). So a micro-batch of ``M`` samples holds ``M`` whole pairs under every layout, and a pair that does
not fit is an error naming its line.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from megalm.data.chat_template import ChatTemplateError
from megalm.data.gpt_dataset import DatasetError
from megalm.data.sft import read_examples, shared_prefix, split_examples

CHOSEN, REJECTED, PADDING = 0, 1, 2  # the documents of a pair's sample


def _messages(value, what: str, where: str):
    """A completion or prompt as messages (a string completion is one assistant message), or a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value):
        return value
    raise DatasetError(f"{where}: {what} must be text, a message or a list of messages")


def split_pair(example: dict, where: str) -> tuple:
    """(prompt, chosen, rejected): three strings, or three lists of messages."""
    if "chosen" not in example or "rejected" not in example:
        raise DatasetError(f"{where}: a preference pair needs 'chosen' and 'rejected' (keys here: "
                           f"{', '.join(list(example)[:8])})")
    chosen = _messages(example["chosen"], "'chosen'", where)
    rejected = _messages(example["rejected"], "'rejected'", where)
    prompt = example.get("prompt", example.get("messages"))
    if prompt is None:  # implicit: what the two share
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise DatasetError(f"{where}: 'chosen' and 'rejected' must both be text or both be messages")
        n = shared_prefix(chosen, rejected)  # characters, or messages
        if isinstance(chosen, str) and n and chosen[n - 1] == " ":
            n -= 1  # a space before the completions belongs to them
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = _messages(prompt, "'prompt'", where)
    if isinstance(prompt, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            raise DatasetError(f"{where}: a text prompt needs text completions (or give the prompt as messages)")
        return prompt, chosen, rejected
    as_turns = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in (chosen, rejected)]
    if not all(any(m["role"] == "assistant" for m in turns) for turns in as_turns):
        raise DatasetError(f"{where}: 'chosen' and 'rejected' must each hold an assistant turn")
    return prompt, as_turns[0], as_turns[1]


def tokenize_pair(prompt, chosen, rejected, tokenizer, template, where: str) -> Tuple[list, list, list]:
    """(prompt ids, chosen ids, rejected ids)."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer.tokenize(prompt)
        full = [tokenizer.tokenize(prompt + c) + [tokenizer.eod] for c in (chosen, rejected)]
    else:
        if template is None:
            raise DatasetError(f"{where}: conversations need a chat template; the tokenizer has none (give "
                               f"--chat-template FILE.jinja or a tokenizer directory with one)")
        try:
            prompt_ids = template.encode_text(template.render(prompt, add_generation_prompt=True))
            full = [template.encode_text(template.render(prompt + c)) for c in (chosen, rejected)]
        except ChatTemplateError as exc:
            raise DatasetError(f"{where}: {exc}") from None
    n = min(shared_prefix(prompt_ids, f) for f in full)
    return prompt_ids[:n], full[0][n:], full[1][n:]


def pair_sample(prompt: list, chosen: list, rejected: list, size: int, where: str) -> dict:
    """One pair's sample of ``size`` tokens (``ids``, ``targets``, ``docs``)."""
    need = 2 * len(prompt) + len(chosen) + len(rejected)
    if need > size:
        raise DatasetError(f"{where}: the pair takes {need} tokens (prompt {len(prompt)}, twice, chosen "
                           f"{len(chosen)}, rejected {len(rejected)}), more than --seq-length + 1 = {size}: raise "
                           f"--seq-length or shorten the pair")
    if not chosen or not rejected:
        raise DatasetError(f"{where}: 'chosen' or 'rejected' adds no token after the prompt")
    ids = np.zeros(size, dtype=np.int32)
    targets, docs = np.zeros(size, dtype=np.uint8), np.full(size, PADDING, dtype=np.int32)
    at = 0
    for doc, completion in ((CHOSEN, chosen), (REJECTED, rejected)):
        n = len(prompt) + len(completion)
        ids[at:at + n] = prompt + completion
        docs[at:at + n] = doc
        targets[at + max(len(prompt), 1):at + n] = 1  # a document's first token is never predicted
        at += n
    return {"ids": ids, "targets": targets, "docs": docs}


def pair_parser(tokenizer, seq_length: int, template=None):
    """``parse(example, where) -> sample`` of one preference line."""
    def parse(example, where):
        return pair_sample(*tokenize_pair(*split_pair(example, where), tokenizer, template, where), seq_length + 1,
                           where)

    return parse


def read_pairs(path: str, tokenizer, seq_length: int, template=None) -> List[dict]:
    return [sample for _, sample in read_examples(path, pair_parser(tokenizer, seq_length, template))]


def stack(samples: List[dict]) -> dict:
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def stack_splits(samples: List[dict], split: List[float]) -> dict:
    """``{"train": arrays, "valid": arrays}`` (valid only when ``--split`` gives it a share), a pair per sample."""
    train, valid = split_examples(samples, split)
    return {"train": stack(train), **({"valid": stack(valid)} if valid else {})}
