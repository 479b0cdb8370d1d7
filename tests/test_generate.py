"""megalm-generate from a trained checkpoint: KV cache and recompute agree, a padded batch equals each prompt
alone, TP 2, PP 2 and TP 2 x PP 2 equal one process, and the HTTP endpoint answers like the command line."""
import json
import os
import subprocess
import time
import urllib.request

import pytest

from conftest import PYTHON, ROOT, free_port, run_module, tiny_train_flags, torchrun
from megalm.pretrain import main

PROMPTS = ["Return the", "The object of the class", "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset_prefix, bpe_flags):
    ck = tmp_path_factory.mktemp("gen") / "ck"
    flags = tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "6", "--lr", "3e-3", "--save", str(ck),
                             "--position-embedding-type", "rope", "--num-query-groups", "2")
    assert main([str(f) for f in flags]) == 0
    return ck


def prompts_args():
    return [a for p in PROMPTS for a in ("--prompt", p)]


def test_cache_batching_and_errors(checkpoint):
    outs = []
    for extra in ([], ["--no-kv-cache"], ["--batch-size", "1"]):
        res = run_module("megalm.generate", "--load", checkpoint, *prompts_args(), "--max-new-tokens", "12",
                         "--no-stop-at-eod", *extra)
        assert res.returncode == 0, res.stderr
        assert all(f"--- prompt: {p!r}" in res.stdout for p in PROMPTS)
        outs.append(res.stdout)
    assert outs[0] == outs[1] == outs[2]  # cache = recompute; padded batch of 3 = one prompt at a time
    res = run_module("megalm.generate", "--load", checkpoint, "--prompt", "x", "--temperature", "0.9",
                     "--top-k", "20", "--top-p", "0.9", "--max-new-tokens", "5")
    assert res.returncode == 0, res.stderr
    res = run_module("megalm.generate", "--load", checkpoint.parent / "nothing", "--prompt", "x")
    assert res.returncode == 2 and "not a megalm checkpoint" in res.stderr


@pytest.mark.parametrize("procs,layout", [(2, ["--tensor-model-parallel-size", "2"]),
                                           (2, ["--pipeline-model-parallel-size", "2"]),
                                           (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
                                                "2"])], ids=["tp2", "pp2", "tp2pp2"])
def test_parallel_generation_equals_one_process(checkpoint, procs, layout):
    args = ["--load", checkpoint, *prompts_args(), "--max-new-tokens", "12", "--no-stop-at-eod"]
    one = run_module("megalm.generate", *args)
    many = torchrun(procs, "megalm/generate.py", *args, *layout)
    assert one.returncode == 0 and many.returncode == 0, many.stderr[-2000:]
    assert [line for line in many.stdout.splitlines() if not line.startswith("[rank")] == one.stdout.splitlines()


def test_pipeline_generation_needs_divisible_layers(checkpoint):
    res = torchrun(3, "megalm/generate.py", "--load", checkpoint, "--prompt", "x", "--pipeline-model-parallel-size",
                   "3")
    assert res.returncode != 0 and "does not divide the checkpoint's" in res.stderr


def test_http_endpoint(checkpoint):
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "megalm.generate", "--load", str(checkpoint), "--serve", "--port",
                             str(port), "--no-stop-at-eod"], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"prompts": PROMPTS, "max_new_tokens": 12}).encode()
        for _ in range(300):
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                             headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
                break
            except (ConnectionError, urllib.error.URLError):
                time.sleep(0.2)
        else:
            raise AssertionError("server did not answer")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    cli = run_module("megalm.generate", "--load", checkpoint, *prompts_args(), "--max-new-tokens", "12",
                     "--no-stop-at-eod")
    for prompt, text in zip(PROMPTS, reply["texts"]):
        assert f"--- prompt: {prompt!r}\n{prompt}{text}\n" in cli.stdout
