"""The shape of the house, kept true: imports point one way between megalm's layers and never in a circle, no file
outgrows ~600 lines, and ``megalm-preprocess`` runs without torch."""
import ast
import os
import subprocess

from conftest import PYTHON, ROOT

PACKAGE = os.path.join(ROOT, "megalm")
# Lowest first. A module may import its own package and the ones of a lower layer; a package of a layer imports no
# other package of the same layer.
LAYERS = [
    {"config"},  # the dataclass tree: no torch, imports nothing of megalm's
    {"_C", "_bpe"},  # the compiled extensions (csrc/)
    {"kernels"},  # gates over megalm._C with torch references
    {"data"},  # formats, tokenizers, indices: independent of the model
    {"parallel"},  # process groups and autograd collectives
    {"model", "optim", "pipeline"},  # the GPT, the sharded optimizer, the schedules
    {"training"},  # the loop, checkpoints, logging
    {"interop"},  # Hugging Face and Megatron-LM converters
    {"tools", "pretrain", "generate"},  # commands
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict:
    """megalm module name -> its source path."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = path
    return found


def _imports(path: str, module: str) -> list:
    """(imported megalm module, line) of every import in the file, at module level or inside functions."""
    out = []
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "megalm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "megalm":
                out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def _resolve(name: str, modules: dict):
    """The megalm module an imported name lives in (``megalm.config.ConfigError`` -> ``megalm.config``)."""
    if name.split(".")[:2] in (["megalm", "_C"], ["megalm", "_bpe"]):
        return ".".join(name.split(".")[:2])  # compiled, not in the sources
    while name and name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "megalm"


def _graph():
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        graph[module] = {}
        for name, line in _imports(path, module):
            target = _resolve(name, modules) or name
            if target != module:
                graph[module].setdefault(target, line)
    return modules, graph


def _upward(graph: dict) -> list:
    """(module, imported module, line) of every import into another package that is not of a lower layer."""
    wrong = []
    for module, targets in graph.items():
        here = _part(module)
        for target, line in targets.items():
            there = _part(target)
            if there != here and (here not in RANK or there not in RANK or RANK[there] >= RANK[here]):
                wrong.append((module, target, line))
    return wrong


def test_imports_point_down_the_layers():
    modules, graph = _graph()
    assert not graph.pop("megalm"), "megalm/__init__.py imports nothing"
    unplaced = {_part(m) for m in graph} - set(RANK)
    assert not unplaced, f"packages with no layer in tests/test_structure.py: {unplaced}"
    wrong = [f"{modules[m]}:{line}: {m} imports {t}" for m, t, line in _upward(graph)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    _, graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt in graph and nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_layer_check_catches_an_upward_import(tmp_path):
    """The walker sees imports inside functions and relative ones: a data module reaching up into tools fails."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..tools.estimate import main\nfrom megalm.model import gpt\n")
    found = sorted(_imports(str(src), "megalm.data.m"))
    assert found == [("megalm.model.gpt", 3), ("megalm.tools.estimate.main", 2)]
    graph = {"megalm.data.m": {"megalm.tools.estimate": 2, "megalm.model.gpt": 3, "megalm.kernels": 4,
                               "megalm.data.indexed": 5}}
    assert sorted(_upward(graph)) == [("megalm.data.m", "megalm.model.gpt", 3),
                                      ("megalm.data.m", "megalm.tools.estimate", 2)]


def test_no_file_over_600_lines():
    long = {path: n for path in _modules().values() if (n := sum(1 for _ in open(path))) > 600}
    assert not long, long


def test_preprocess_imports_no_torch(tmp_path, bpe_flags):
    """megalm-preprocess, a whole run with the BPE tokenizer and 2 workers, never loads torch (0.9 s and ~190 MB
    per process when it did)."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "Hello world."}\n{"text": "A second, longer document."}\n' * 50)
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--workers", "2", *bpe_flags]
    code = ("import sys\nfrom megalm.tools.preprocess_data import main\n"
            f"rc = main({argv!r})\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print('rc', rc, 'torch', loaded[:3])\n")
    res = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "rc 0 torch []" in res.stdout, res.stdout + res.stderr
    assert os.path.getsize(tmp_path / "o_text_document.bin") > 0
