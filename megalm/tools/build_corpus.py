"""Write a real-English JSONL corpus from the docstrings of the Python standard library, offline.

Sources are parsed with ``ast`` (nothing is imported, so no module runs). Files are visited in sorted order and
every document is a module docstring or the docstrings of one top-level class or function, so the output is the
same on every machine with the same Python version.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from typing import Iterator

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def _docstrings(node) -> Iterator[str]:
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child)


def stdlib_files(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _help_topics(root: str) -> Iterator[dict]:
    """The language reference that ``help()`` shows, stored as a dict literal in ``pydoc_data/topics.py``."""
    path = os.path.join(root, "pydoc_data", "topics.py")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield {"text": value.value.strip(), "source": f"pydoc_data.topics.{key.value}"}


def documents(root: str, min_chars: int = 100) -> Iterator[dict]:
    yield from _help_topics(root)
    for path in stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        head = ast.get_docstring(tree, clean=True)
        if head and len(head) >= min_chars:
            yield {"text": head, "source": module}
        for node in tree.body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = "\n\n".join(_docstrings(node))
                if len(text) >= min_chars:
                    yield {"text": text, "source": f"{module}.{node.name}"}


def build_corpus(output: str, max_mb: float = 8.0, root: str = None) -> dict:
    root = root or sysconfig.get_paths()["stdlib"]
    limit = int(max_mb * 1024 * 1024)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    count = size = 0
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        for doc in documents(root):
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            if size + len(line) > limit:
                break
            fh.write(line)
            count += 1
            size += len(line)
    os.replace(tmp, output)
    return {"documents": count, "bytes": size, "root": root}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megalm-build-corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write ({'text': ..., 'source': ...})")
    parser.add_argument("--max-mb", type=float, default=8.0, help="stop before the file exceeds this size")
    args = parser.parse_args(argv)
    stats = build_corpus(args.output, args.max_mb)
    print(f"wrote {stats['documents']} documents, {stats['bytes'] / 1e6:.1f} MB, to {args.output} "
          f"(from {stats['root']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
