"""Gradients of the attention output match float64 autograd through the eager reference."""
import pytest
import torch

import pruneattn
from pruneattn import reference as R
from pruneattn.validate import QUERIES
from helpers import random_qkv, rel_err


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 32), (1, 6, 197, 64), (1, 1, 40, 128)], ids=str)
def test_attention_gradients(shape, backend, query, device):
    dev = device if backend == "triton" else torch.device("cpu")
    q, k, v = (t.detach().requires_grad_() for t in random_qkv(*shape, torch.float32, dev, packed=False, seed=3))
    with pruneattn.use_backend(backend):
        out, scores = pruneattn.attention_scores(q, k, v, query=query, stat="var")
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = R.attention_scores(*ref_in, query=query, stat="var")
    ref_grads = torch.autograd.grad(ref_out, ref_in, g.cpu().double())
    for name, got, ref in zip("qkv", grads, ref_grads):
        assert got.shape == ref.shape
        assert rel_err(got.cpu(), ref) < 1e-5, name


def test_gradients_through_packed_qkv(device):
    # timm's layout: q, k, v are strided views of one (B, N, 3 * H * d) projection.
    qkv = torch.randn(2, 21, 3 * 2 * 32, device=device, requires_grad=True)
    with pruneattn.use_backend("triton"):
        out, _ = pruneattn.attention_scores(*pruneattn.split_qkv(qkv, 2))
    out.square().sum().backward()
    ref_qkv = qkv.detach().cpu().double().requires_grad_()
    ref_out, _ = R.attention_scores(*pruneattn.split_qkv(ref_qkv, 2))
    ref_out.square().sum().backward()
    assert rel_err(qkv.grad.cpu(), ref_qkv.grad) < 1e-5


def test_gradcheck_cpu_path_float64():
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    with pruneattn.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b, c: pruneattn.attention_scores(a, b, c)[0], (q, k, v))
