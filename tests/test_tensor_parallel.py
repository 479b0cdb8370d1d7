"""Tensor-parallel parity at the layer level: TP 2 and 4, with and without sequence parallelism, give the loss,
logits and every (gathered) gradient of one process. Whole training runs: tests/test_layout_parity.py."""
import pytest
import torch

from conftest import torchrun
from parity import FLAVOURS, VOCAB, assert_close, fixed_batch, parity_model_config, unpad
from megalm.model.gpt import GPT


def reference(flavour):
    model = GPT(parity_model_config(**FLAVOURS[flavour]), VOCAB)
    model.init_weights(0)
    tokens, labels = fixed_batch()
    loss = model(tokens, labels).mean()
    loss.backward()
    with torch.no_grad():
        logits = model(tokens)
    grads = {n: unpad(p.grad, p, VOCAB) for n, p in model.named_parameters()}
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
