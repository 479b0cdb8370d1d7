"""The fused softmax kernel against the torch reference on odd shapes, forward and backward; the gate."""
import logging
import os
import shutil
import subprocess

import pytest
import torch

from megalm.kernels import extension
from megalm.kernels.fused_softmax import fused_softmax, softmax_reference, unsupported_reason

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def both(x, scale, mask=None, causal=False):
    a = x.detach().clone().requires_grad_()
    b = x.detach().clone().requires_grad_()
    ya, yb = fused_softmax(a, scale, mask, causal), softmax_reference(b, scale, mask, causal)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    return ya, yb, a.grad, b.grad


@pytest.fixture(autouse=True)
def needs_extension():
    assert extension() is not None, "megalm._C is not built"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (1, 2, 5, 5), (2, 4, 37, 37), (1, 1, 129, 129), (3, 2, 8, 8)])
def test_causal(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 3
    y, r, gx, gr = both(x, 0.37, causal=True)
    tol = TOL[dtype]
    assert torch.allclose(y.float(), r.float(), atol=tol, rtol=tol)
    assert torch.allclose(gx.float(), gr.float(), atol=tol, rtol=tol)
    assert (y.float().triu(1) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 1, 7), (2, 2, 13, 53), (1, 3, 4, 100), (2, 1, 6, 1)])
def test_padding_mask_with_fully_masked_rows(dtype, shape):
    torch.manual_seed(1)
    b, h, sq, sk = shape
    x = torch.randn(shape, dtype=dtype)
    mask = torch.rand(b, 1, sq, sk) < 0.4
    mask[0, 0, 0, :] = True  # a fully masked row: zeros, zero gradient
    y, r, gx, gr = both(x, 1.3, mask)
    tol = TOL[dtype]
    assert torch.allclose(y.float(), r.float(), atol=tol, rtol=tol)
    assert torch.allclose(gx.float(), gr.float(), atol=tol, rtol=tol)
    assert (y[0, :, 0] == 0).all() and (gx[0, :, 0] == 0).all()
    shared = torch.rand(1, 1, sq, sk) < 0.4  # one mask broadcast over the batch
    y, r, _, _ = both(x, 1.3, shared)
    assert torch.allclose(y.float(), r.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmasked(dtype):
    x = torch.randn(2, 3, 7, 31, dtype=dtype)
    y, r, gx, gr = both(x, 0.5)
    assert torch.allclose(y.float(), r.float(), atol=TOL[dtype]) and torch.allclose(gx.float(), gr.float(), atol=TOL[dtype])


def test_gate_falls_back_and_says_why(caplog):
    x = torch.randn(2, 2, 4, 6, dtype=torch.float16)
    assert "fp32/bf16" in unsupported_reason(x, None, False)
    with caplog.at_level(logging.INFO, logger="megalm"):
        y = fused_softmax(x, 1.0)
    assert y.dtype == torch.float16  # softmax computed independently of megalm's reference
    assert torch.allclose(y.float(), torch.softmax(x.float(), dim=-1), atol=1e-3)
    assert "fused softmax: using the torch reference (CPU kernel takes fp32/bf16" in caplog.text
    assert "causal needs sq == sk" in unsupported_reason(torch.randn(1, 1, 3, 5), None, True)
    assert "mask must be" in unsupported_reason(torch.randn(1, 1, 3, 5), torch.ones(3, 5, dtype=torch.bool), False)
    with pytest.raises(ValueError, match="either a padding mask or causal"):
        fused_softmax(torch.randn(1, 1, 3, 3), 1.0, torch.zeros(1, 1, 3, 3, dtype=torch.bool), causal=True)
    with pytest.raises(RuntimeError, match="causal variant needs sq == sk"):  # the kernel checks too
        extension().fused_softmax_forward_cpu(torch.randn(1, 1, 3, 5), None, 1.0, 2)


def _nvcc():
    """nvcc from PATH, CUDA_HOME or /usr/local/cuda; where there is none, the test skips, except under CI
    (``CI=true``: scripts/install.sh's machine has CUDA 13.0), where that is a failure."""
    found = shutil.which("nvcc") or next((p for p in (os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin",
                                                                   "nvcc"), "/usr/local/cuda/bin/nvcc")
                                          if os.path.isfile(p)), None)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("no nvcc (PATH, CUDA_HOME, /usr/local/cuda): the CUDA sources are not compile-checked")
        pytest.skip("no nvcc")
    return found


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_sources_compile(tmp_path, arch):
    import glob

    from conftest import ROOT

    nvcc = _nvcc()
    sources = glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
    assert sources
    for src in sources:
        res = subprocess.run([nvcc, "-c", src, "-o", str(tmp_path / "k.o"), f"-arch={arch}", "-std=c++17", "-O3",
                              "-Xcompiler", "-Wall"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
