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
    x = torch.randn(b, h, sq, sk, device="cuda", dtype=dtype)
    mask = None
    if kind == "padding":
        mask = torch.rand(b, 1, sq, sk, device="cuda") < 0.3
        mask[0, 0, 0] = True
    assert unsupported_reason(x, mask, kind == "causal") is None
    a, r = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fused_softmax(a, 0.125, mask, kind == "causal")
    yr = softmax_reference(r, 0.125, mask, kind == "causal")
    g = torch.randn_like(ya)
    ya.backward(g)
    yr.backward(g)
    assert torch.allclose(ya.float(), yr.float(), atol=2e-3, rtol=2e-2)
    assert torch.allclose(a.grad.float(), r.grad.float(), atol=2e-3, rtol=2e-2)
