"""Reading JSON-lines corpora: files or globs, plain or ``.gz``, errors that name the file and line."""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
import re
from typing import Iterator, List, Optional, Tuple


class JsonlError(ValueError):
    """A line that is not a JSON object with the requested string fields."""


# the only way a surrogate code point gets into decoded UTF-8 text: a \uD800-\uDFFF escape
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def expand_inputs(patterns: List[str]) -> List[str]:
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise FileNotFoundError(f"--input {pattern}: matches no file")
        for path in matched:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--input {path}: no such file")
        files.extend(matched)
    return files


def open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_lines(files: List[str], start_line: int = 0) -> Iterator[Tuple[str, int, str]]:
    """(file, 1-based line number, line) for every line of every file."""
    for path in files:
        with open_text(path) as fh:
            try:
                for lineno, line in enumerate(fh, 1):
                    yield path, lineno, line
            except UnicodeDecodeError as exc:
                raise JsonlError(f"{path}: not UTF-8 text ({exc})") from None


def parse_object(line: str, where: str) -> Optional[dict]:
    """The JSON object on one line (None for a blank line), or a JsonlError naming ``where``."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise JsonlError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise JsonlError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_document(line: str, keys: List[str], where: str) -> Optional[dict]:
    """The requested fields of one line (None for a blank line); each field a string or a list of strings."""
    obj = parse_object(line, where)
    if obj is None:
        return None
    out, suspect = {}, has_surrogate_escape(line)
    for key in keys:
        if key not in obj:
            raise JsonlError(f"{where}: no key {key!r} (keys here: {', '.join(list(obj)[:8])})")
        value = obj[key]
        if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            raise JsonlError(f"{where}: {key!r} must be a string or a list of strings, got {type(value).__name__}")
        if suspect:
            for text in [value] if isinstance(value, str) else value:
                check_text(text, repr(key), where)
        out[key] = value
    return out


def has_surrogate_escape(line: str) -> bool:
    """Whether a raw line could decode to text with an unpaired surrogate (worth ``check_text`` on its fields)."""
    return _SURROGATE_ESCAPE.search(line) is not None


def check_text(text: str, what: str, where: str) -> None:
    """A JsonlError naming ``where`` when ``text`` holds an unpaired surrogate, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JsonlError(f"{where}: {what} holds an unpaired surrogate escape "
                         f"({text[exc.start]!r} at character {exc.start}), which is not text") from None


def iter_documents(inputs: List[str], keys: List[str]) -> Iterator[dict]:
    for path, lineno, line in iter_lines(expand_inputs(inputs)):
        doc = parse_document(line, keys, f"{path}:{lineno}")
        if doc is not None:
            yield {k: (v if isinstance(v, str) else " ".join(v)) for k, v in doc.items()}
