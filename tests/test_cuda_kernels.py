"""CUDA fused softmax against the torch reference (runs where a GPU and a CUDA build of megalm._C exist)."""
import pytest
import torch

from megalm.kernels import extension
from megalm.kernels.fused_softmax import fused_softmax, softmax_reference, unsupported_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not getattr(extension(), "with_cuda", False),
                                reason="needs a GPU and megalm._C built with CUDA")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["causal", "padding", "unmasked"])
@pytest.mark.parametrize("sk", [20, 68, 500, 1028, 4096])
def test_cuda_matches_reference(dtype, kind, sk):
    torch.manual_seed(0)
    b, h = 2, 4
    sq = sk if kind == "causal" else 16
    # peaked rows (scale 8 and a few large entries): a near-uniform softmax would let an all-zero output pass
    x = torch.randn(b, h, sq, sk, device="cuda") * 8
    x[..., torch.randint(0, sk, (3,))] += 20
    x = x.to(dtype)
    mask = None
    if kind == "padding":
        mask = torch.rand(b, 1, sq, sk, device="cuda") < 0.3
        mask[0, 0, 0] = True
    assert unsupported_reason(x, mask, kind == "causal") is None
    a, r = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fused_softmax(a, 1.0, mask, kind == "causal")
    yr = softmax_reference(r, 1.0, mask, kind == "causal")
    assert yr.float().amax(-1).mean() > 0.3  # the rows really are peaked
    g = torch.randn_like(ya)
    ya.backward(g)
    yr.backward(g)
    for got, ref in ((ya, yr), (a.grad, r.grad)):
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 2e-2, err
