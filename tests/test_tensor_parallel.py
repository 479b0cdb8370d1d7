"""Tensor-parallel parity: TP 2 and 4, with and without sequence parallelism, give the loss, logits and every
(gathered) gradient of one process, and training through the real entry point under torchrun gives the same
per-iteration losses."""
import json

import pytest
import torch

from conftest import tiny_train_flags, torchrun
from parity import FLAVOURS, VOCAB, assert_close, fixed_batch, parity_model_config
from megalm.model.gpt import GPT
from megalm.pretrain import main
from megalm.training.checkpoint import _unpad


def reference(flavour):
    model = GPT(parity_model_config(**FLAVOURS[flavour]), VOCAB)
    model.init_weights(0)
    tokens, labels = fixed_batch()
    loss = model(tokens, labels).mean()
    loss.backward()
    with torch.no_grad():
        logits = model(tokens)
    grads = {n: _unpad(p.grad, p, VOCAB) for n, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads, "logits": logits}


@pytest.mark.parametrize("tp, sp", [(2, False), (4, False), (2, True), (4, True)], ids=["tp2", "tp4", "tp2-sp", "tp4-sp"])
def test_forward_backward_parity(tmp_path, tp, sp):
    out = tmp_path / "tp.pt"
    res = torchrun(tp, "tests/tp_worker.py", "--tp", tp, "--out", out, *(["--sequence-parallel"] if sp else []))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    for flavour in FLAVOURS:
        ref = reference(flavour)
        assert_close(got[flavour]["loss"], ref["loss"], 1e-5, f"{flavour} TP{tp} loss")
        assert_close(got[flavour]["logits"], ref["logits"], 1e-5, f"{flavour} TP{tp} logits")
        assert set(got[flavour]["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            assert_close(got[flavour]["grads"][name], g, 1e-4, f"{flavour} TP{tp} grad {name}")


def losses(path):
    with open(path) as fh:
        return [r["loss"] for r in map(json.loads, fh) if "loss" in r]


@pytest.mark.parametrize("flavour_flags", [[], ["--position-embedding-type", "rope", "--normalization", "RMSNorm",
                                                "--swiglu", "--untie-embeddings-and-output-weights",
                                                "--num-query-groups", "2", "--disable-bias-linear",
                                                "--sequence-parallel"]],
                         ids=["gpt2", "llama-sp"])
def test_pretrain_tp2_matches_one_process(tmp_path, dataset_prefix, bpe_flags, flavour_flags):
    flags = [str(f) for f in tiny_train_flags(dataset_prefix, bpe_flags, "--train-iters", "10", *flavour_flags)]
    assert main(flags + ["--metrics-file", str(tmp_path / "one.jsonl")]) == 0
    res = torchrun(2, "megalm/pretrain.py", *flags, "--tensor-model-parallel-size", "2", "--metrics-file",
                   tmp_path / "tp2.jsonl")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    one, tp2 = losses(tmp_path / "one.jsonl"), losses(tmp_path / "tp2.jsonl")
    assert len(one) == len(tp2) == 10
    for i, (a, b) in enumerate(zip(one, tp2), 1):
        assert abs(a - b) / abs(a) < 1e-5, f"iteration {i}: {a} vs {b}"
