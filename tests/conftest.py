"""Shared fixtures: a small real-English corpus, a BPE tokenizer trained on it, and its preprocessed dataset.

Built once per test session under a temporary directory; everything offline.
"""
import importlib
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def require(module: str):
    """Import ``module`` for a test: skipped where it is not installed, but under CI (``CI=true``), where
    scripts/install.sh installs it, its absence fails the test instead of hiding it."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(module)
    return pytest.importorskip(module)


def run_module(module, *args, env=None, timeout=600):
    """Run ``python -m module args`` as a user would; returns the CompletedProcess (never raises on failure)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([PYTHON, "-m", module, *map(str, args)], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, module_path, *args, timeout=900, env=None):
    """``torchrun --nproc_per_node N megalm/...py args`` on localhost with gloo."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), module_path, *map(str, args)]
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def deepspeed_launch(nproc, module_path, *args, timeout=900):
    """``deepspeed --num_gpus N megalm/...py args`` on localhost (DeepSpeed's CPU accelerator, gloo). The
    shared-memory op it compiles on first use is cached under .venv so later runs skip the ~45 s build."""
    cmd = [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(free_port()),
           module_path, *map(str, args)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=os.path.join(ROOT, ".venv", "torch_extensions"))
    before = _deepspeed_shm_files()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    left = _deepspeed_shm_files() - before
    for name in left:  # removed so one failure does not fill /dev/shm (memory) for the rest of the suite
        os.unlink(os.path.join("/dev/shm", name))
    assert not left, f"the DeepSpeed run left its shared-memory buffers in /dev/shm: {sorted(left)}"
    return res


def _deepspeed_shm_files() -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer")} \
        if os.path.isdir("/dev/shm") else set()


def pytest_runtest_logreport(report):
    """A failure's report is printed when it happens, not only in the summary at the end: a suite killed later
    (out of time or memory) still shows why each earlier test failed."""
    if report.failed:
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when}):\n{report.longreprtext[-6000:]}\n")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("megalm")


@pytest.fixture(scope="session")
def corpus(workdir):
    from megalm.tools.build_corpus import build_corpus

    path = str(workdir / "corpus.jsonl")
    build_corpus(path, max_mb=0.6)
    return path


@pytest.fixture(scope="session")
def bpe_dir(workdir, corpus):
    from megalm.tools.train_tokenizer import train_bpe

    out = str(workdir / "bpe")
    train_bpe([corpus], ["text"], 1024, out)
    return out


@pytest.fixture(scope="session")
def bpe_flags(bpe_dir):
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(bpe_dir, "vocab.json"),
            "--merge-file", os.path.join(bpe_dir, "merges.txt")]


@pytest.fixture(scope="session")
def dataset_prefix(workdir, corpus, bpe_flags):
    from megalm.tools.preprocess_data import build_parser, run

    prefix = str(workdir / "corpus")
    run(build_parser().parse_args(["--input", corpus, "--output-prefix", prefix, "--append-eod", "--workers", "2",
                                   *bpe_flags]))
    return prefix + "_text_document"


@pytest.fixture(scope="session")
def corpus_texts(corpus):
    with open(corpus) as fh:
        return [json.loads(line)["text"] for line in fh]


def tiny_train_flags(dataset_prefix, bpe_flags, *extra):
    """A model and run small enough for a test: 2 layers, width 32, sequence 32."""
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "2",
            "--eval-interval", "4", "--eval-iters", "2", "--split", "90,10,0", "--log-interval", "1",
            "--data-path", dataset_prefix, *bpe_flags, *extra]


def pretrain_run(tmp, nproc: int, argv: list):
    """``megalm.pretrain argv`` with a metrics file and a save directory under ``tmp``: in this process when
    ``nproc`` is 1, else under torchrun. Returns (every metrics row, the final parameters as whole tensors)."""
    from megalm.pretrain import main
    from megalm.training.checkpoint import read_checkpoint

    argv = [str(a) for a in argv] + ["--metrics-file", str(tmp / "m.jsonl"), "--save", str(tmp / "ck")]
    if nproc == 1:
        assert main(argv) == 0
    else:
        res = torchrun(nproc, "megalm/pretrain.py", *argv)
        assert res.returncode == 0, res.stderr[-3000:]
    with open(tmp / "m.jsonl") as fh:
        metrics = [json.loads(line) for line in fh]
    return metrics, read_checkpoint(str(tmp / "ck"), parts=("model",))["model"]
