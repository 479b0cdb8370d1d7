"""Recomputation parity: the same losses and gradients with and without recomputation, dropout included."""
import pytest
import torch

from test_model import GPT2, LLAMA, model_config
from megalm.model.gpt import GPT

SETTINGS = [dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
            dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
            dict(recompute_granularity="selective")]


def loss_and_grads(flavour, **recompute):
    torch.manual_seed(7)  # the default generator drives hidden dropout
    m = GPT(model_config(**flavour, hidden_dropout=0.1, attention_dropout=0.1, **recompute), 300)
    m.init_weights(3)
    m.train()
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):  # two steps, so generator states carried across steps are checked too
        loss = m(x, x.roll(-1, 1)).mean()
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("recompute", SETTINGS, ids=["full-uniform-1", "full-uniform-2", "full-block-1", "selective"])
def test_recompute_changes_nothing(flavour, recompute):
    ref_loss, ref_grads = loss_and_grads(flavour)
    loss, grads = loss_and_grads(flavour, **recompute)
    assert torch.equal(loss, ref_loss)
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-5, atol=1e-7), name
