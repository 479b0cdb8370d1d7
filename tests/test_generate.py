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


def post(port, body: bytes):
    """(status, reply) of POST /generate; raises ConnectionError while the server is not up yet."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        return 200, json.loads(urllib.request.urlopen(req, timeout=120).read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except urllib.error.URLError as exc:
        raise ConnectionError(exc) from None


@pytest.mark.parametrize("procs", [1, 2], ids=["one", "tp2"])
def test_http_endpoint(checkpoint, procs):
    """Bad requests (not JSON, wrong types, too many prompts, too many tokens, unknown fields, a body over the
    limit) get 400/413 and every rank keeps serving: the next good request is answered as the command line
    answers it. Under TP 2 the other rank once died on the first bad request."""
    port = free_port()
    serve_args = ["--load", str(checkpoint), "--serve", "--port", str(port), "--no-stop-at-eod",
                  "--max-prompts", "3", "--max-new-tokens-limit", "20", "--max-request-bytes", "2000",
                  "--max-new-tokens", "8"]
    if procs == 1:
        cmd = [PYTHON, "-m", "megalm.generate", *serve_args]
    else:
        cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               "megalm/generate.py", *serve_args, "--tensor-model-parallel-size", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                status, reply = post(port, b"not json")
                break
            except ConnectionError:
                assert proc.poll() is None, proc.communicate()[0][-3000:]
                time.sleep(0.2)
        else:
            raise AssertionError("server did not answer")
        assert status == 400 and "not JSON" in reply["error"]
        bad = [({"prompts": "x"}, "non-empty list of strings"), ({"prompts": ["a", "b", "c", "d"]}, "--max-prompts 3"),
               ({"prompts": ["x"], "max_new_tokens": 21}, "--max-new-tokens-limit 20"),
               ({"prompts": ["x"], "max_new_tokens": "5"}, "must be an integer"),
               ({"prompts": ["x"], "top_p": 0}, "top_p"), ({"prompts": ["x"], "beam": 2}, "unknown field(s) beam"),
               ({"prompts": [""]}, "empty prompt")]
        for body, message in bad:
            status, reply = post(port, json.dumps(body).encode())
            assert status == 400 and message in reply["error"], (body, reply)
        status, reply = post(port, json.dumps({"prompts": ["x" * 3000]}).encode())
        assert status == 413 and "--max-request-bytes 2000" in reply["error"]
        status, reply = post(port, json.dumps({"prompts": PROMPTS, "max_new_tokens": 12}).encode())
        assert status == 200, reply
        assert proc.poll() is None
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    cli = run_module("megalm.generate", "--load", checkpoint, *prompts_args(), "--max-new-tokens", "12",
                     "--no-stop-at-eod")
    assert len(reply["texts"]) == len(PROMPTS)
    for prompt, text in zip(PROMPTS, reply["texts"], strict=True):
        assert f"--- prompt: {prompt!r}\n{prompt}{text}\n" in cli.stdout, out[-2000:]
