"""Chat templates: a tokenizer's own Jinja template, rendered as transformers' ``apply_chat_template`` renders it,
and which characters of the rendering are the assistant's (what fine-tuning learns).

Rendering: the same sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, loop controls,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text), with the tokenizer's named special
tokens (``bos_token``, ``eos_token``, ...) in scope, messages stripped of keys whose value is None and reasoning
given under every name templates read it by. The rendering is tokenized as it is (no special tokens added), so the
ids equal ``apply_chat_template(..., tokenize=True)``.

The assistant's part:

- a template with ``{% generation %} ... {% endgeneration %}`` marks it itself (transformers'
  ``return_assistant_tokens_mask``);
- otherwise each assistant turn is found by rendering the conversation again, turn by turn: with that turn's text
  replaced by two different probes, the part of the whole rendering that changes is what the turn's text became
  (Qwen3 moves reasoning, Llama trims); it is extended back to where the template's generation prompt ends
  (``add_generation_prompt``: what the model is given, so what follows, a reasoning placeholder included, is
  the model's to produce) and forward over what closes the turn when it ends the conversation (``<|eot_id|>``,
  ``<|im_end|>\\n``, ``</s>``). No text is guessed: every boundary comes from the template's own renderings.

A token carries loss when it overlaps the assistant's characters (transformers' rule for its mask).
"""
from __future__ import annotations

import json
import os
import re
from datetime import datetime
from typing import Callable, List, Optional, Sequence, Tuple

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
PROBES = ("\u2460megalm-turn-probe\u2461", "\u2462megalm-turn-probe\u2463")  # differ in first and last character
TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json", "chat_template.json")


class ChatTemplateError(ValueError):
    """A template that cannot be found or rendered, or a conversation it cannot mark; the message names which."""


def _token_text(value) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's fields."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            out = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"{path}: unreadable ({exc})") from None
    if not isinstance(out, dict):
        raise ChatTemplateError(f"{path}: expected a JSON object")
    return out


def find_templates(folder: str) -> Tuple[dict, dict]:
    """(named templates, special tokens) of a tokenizer directory: ``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template`` (one string, or a list of ``{name, template}``), else a
    processor's ``chat_template.json``; the single one is named ``default``. Special tokens from
    ``tokenizer_config.json``, then ``special_tokens_map.json``."""
    templates, config = {}, {}
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        config = _read_json(cfg_path)
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            templates["default"] = fh.read()
    raw = config.get("chat_template")
    processor = os.path.join(folder, "chat_template.json")
    if raw is None and not templates and os.path.isfile(processor):
        raw = _read_json(processor).get("chat_template")
    if isinstance(raw, str) and "default" not in templates:
        templates["default"] = raw
    elif isinstance(raw, list):
        for entry in raw:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"),
                                                                                               str):
                templates.setdefault(entry["name"], entry["template"])
    special = {}
    extra = os.path.join(folder, "special_tokens_map.json")
    for source in (config, _read_json(extra) if os.path.isfile(extra) else {}):
        for name in SPECIAL_TOKEN_NAMES:
            text = _token_text(source.get(name))
            if text is not None:
                special.setdefault(name, text)
    return templates, special


def load_chat_template(tokenizer_dir: Optional[str], choice: Optional[str], encode) -> "ChatTemplate":
    """The template of ``--chat-template`` (a Jinja file, a tokenizer directory, or the name of one of the
    tokenizer's templates) or else the tokenizer's own (``default``). ``encode(text) -> (ids, offsets)``."""
    templates, special = find_templates(tokenizer_dir) if tokenizer_dir else ({}, {})
    where = tokenizer_dir or "the tokenizer"
    if choice is None:
        if "default" not in templates:
            raise ChatTemplateError(
                f"{where} has no chat template (none in {', '.join(TEMPLATE_FILES)}"
                + (f"; it has named ones: {', '.join(sorted(templates))}" if templates else "")
                + "): give --chat-template FILE.jinja, or a tokenizer directory that has one")
        return ChatTemplate(templates["default"], special, encode, f"{where} (chat template)")
    if os.path.isfile(choice):
        with open(choice, encoding="utf-8") as fh:
            return ChatTemplate(fh.read(), special, encode, choice)
    if os.path.isdir(choice):
        other, other_special = find_templates(choice)
        if "default" not in other:
            raise ChatTemplateError(f"--chat-template {choice}: no chat template in that directory (looked in "
                                    f"{', '.join(TEMPLATE_FILES)})")
        return ChatTemplate(other["default"], {**other_special, **special}, encode, choice)
    if choice in templates:
        return ChatTemplate(templates[choice], special, encode, f"{where} (chat template {choice!r})")
    raise ChatTemplateError(f"--chat-template {choice}: not a file or directory, and not a template of {where} "
                            f"(it has: {', '.join(sorted(templates)) or 'none'})")


def _environment(tracker: list):
    """The sandboxed environment chat templates are written for, with ``{% generation %}`` blocks recording
    their place in the output through ``tracker`` (``[chunks so far, spans]`` while a render is tracked)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            if tracker:
                chunks, spans = tracker
                start = sum(map(len, chunks))
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        """A namespace that refuses private names (no way out of the sandbox through its attributes)."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            for name in dict(*rest, **kwargs):
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson

    class Dict:
        """``dict(...)`` and ``dict.fromkeys(...)`` in a template, nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       namespace=Namespace, dict=Dict())
    return env


def _plain(value):
    """JSON data only: what a template may see of a message."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def normalize_messages(messages: Sequence[dict]) -> List[dict]:
    """Messages as transformers hands them to a template: keys whose value is None dropped, a message's reasoning
    under ``reasoning_content`` and ``thinking`` whichever name it came under."""
    out = []
    for message in messages:
        m = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_KEYS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _common_suffix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a[::-1], b[::-1]]))


class ChatTemplate:
    """One template: ``render`` a conversation, ``spans`` of its assistant text, ``encode`` to ids and a loss
    mask. ``encode(text) -> (ids, offsets)`` tokenizes without adding special tokens."""

    def __init__(self, source: str, special_tokens: dict, encode: Callable, where: str):
        import jinja2

        self.source, self.special, self._encode, self.where = source, dict(special_tokens), encode, where
        self._tracker: list = []
        try:
            self._template = _environment(self._tracker).from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{where}: not a valid Jinja template ({exc})") from None
        self.marks_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False, tools=None,
               track: bool = False, **kwargs):
        """The rendered text (with ``track``: and the ``{% generation %}`` spans in it)."""
        import jinja2

        context = dict(self.special, **kwargs)
        context.update(messages=normalize_messages(messages), tools=_plain(tools), documents=None,
                       add_generation_prompt=add_generation_prompt)
        try:
            if not track:
                return self._template.render(**context)
            chunks, spans = [], []
            self._tracker[:] = [chunks, spans]
            try:
                for chunk in self._template.generate(**context):
                    chunks.append(chunk)
            finally:
                self._tracker.clear()
            return "".join(chunks), spans
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self.where}: the template refuses this conversation: {exc}") from None
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise ChatTemplateError(f"{self.where}: rendering failed: {type(exc).__name__}: {exc}") from None

    def spans(self, messages: Sequence[dict], tools=None, **kwargs) -> Tuple[str, List[Tuple[int, int]]]:
        """The whole conversation's rendering and the character spans of its assistant turns."""
        if self.marks_generation:
            return self.render(messages, tools=tools, track=True, **kwargs)
        text = self.render(messages, tools=tools, **kwargs)
        spans, floor = [], 0
        for i, message in enumerate(messages):
            if message.get("role") == "assistant":
                span = self._turn(messages, i, text, floor, tools, kwargs)
                spans.append(span)
                floor = span[1]
        return text, spans

    def _turn(self, messages, i: int, text: str, floor: int, tools, kwargs) -> Tuple[int, int]:
        """Where assistant turn ``i`` lies in ``text`` (see the module's docstring)."""
        content = messages[i].get("content")
        if not isinstance(content, str):
            raise ChatTemplateError(f"{self.where}: assistant message {i} has no text content, which the turn-by-turn "
                                    f"rule needs to find it; use a template with {{% generation %}} markers")
        probed = []
        for probe in PROBES:
            swapped = [dict(m, content=probe) if j == i else m for j, m in enumerate(messages)]
            probed.append(self.render(swapped, tools=tools, **kwargs))
        start = min(_common_prefix(text, p) for p in probed)
        end = max(len(text) - min(_common_suffix(text, p) for p in probed), start)
        before = self.render(messages[:i], tools=tools, **kwargs)
        prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools, **kwargs)
        opening = prompt[len(before):] if prompt.startswith(before) else ""
        if opening:
            at = text.rfind(opening, floor, start)
            if at < 0:
                raise ChatTemplateError(f"{self.where}: the generation prompt {opening!r} does not stand before "
                                        f"assistant message {i} in the rendered conversation")
            start = min(start, at + len(opening))
        alone = self.render(messages[:i] + [dict(messages[i], content=PROBES[0])], tools=tools, **kwargs)
        closing = alone[alone.rfind(PROBES[0]) + len(PROBES[0]):] if PROBES[0] in alone else ""
        if not text.startswith(closing, end):
            raise ChatTemplateError(f"{self.where}: assistant message {i} is closed by {closing!r} when it ends the "
                                    f"conversation but not inside it; use a template with {{% generation %}} markers")
        return start, end + len(closing)

    def encode_text(self, text: str) -> List[int]:
        """The ids of a rendering (no special tokens added: the template wrote them)."""
        return list(self._encode(text)[0])

    def encode(self, messages: Sequence[dict], tools=None, **kwargs) -> Tuple[List[int], List[int]]:
        """Token ids of the rendered conversation and a 0/1 mask of the assistant's tokens."""
        text, spans = self.spans(messages, tools=tools, **kwargs)
        ids, offsets = self._encode(text)
        return list(ids), token_mask(offsets, spans)


def token_mask(offsets: Sequence[Tuple[int, int]], spans: Sequence[Tuple[int, int]]) -> List[int]:
    """1 for every token whose characters overlap a span (spans and offsets both in order)."""
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask
