"""The second CUDA backend for query="cls": SDPA + the class-row kernel (kernels/class_row.py).

Under TRITON_INTERPRET=1 (no GPU) the kernel runs on the CPU; the reference is the eager spec in fp64.
"""
from __future__ import annotations

import math

import pytest
import torch

import pruneattn
from pruneattn import backend
from pruneattn import reference as R
from pruneattn.kernels.class_row import class_row
from pruneattn.validate import STATS

from helpers import poisoned_allocations, random_qkv

LOG2E = math.log2(math.e)


@pytest.mark.parametrize("shape", [(2, 3, 40, 32), (1, 6, 197, 64), (3, 2, 65, 64), (2, 4, 5, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_class_row_logits_and_lse(shape, dtype, device):
    q, k, _ = random_qkv(*shape, dtype, device)
    scale = shape[-1] ** -0.5
    with poisoned_allocations():
        logits, lse = (t.cpu().double() for t in class_row(q, k, scale))
    qd, kd = q.cpu().double(), k.cpu().double()
    ref_logits = (qd[:, :, 0:1] @ kd.transpose(-2, -1))[:, :, 0] * scale * LOG2E
    lse2 = torch.logsumexp(ref_logits / LOG2E, dim=-1) * LOG2E
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(logits, ref_logits, atol=tol * ref_logits.abs().max().item(), rtol=tol)
    torch.testing.assert_close(lse, lse2, atol=tol * lse2.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("num_prefix", [1, 2])
def test_sdpa_backend_matches_reference(stat, num_prefix, device):
    q, k, v = random_qkv(2, 6, 50, 64, torch.float32, device)
    with pruneattn.use_backend("triton"), backend.use_attention_kernel("sdpa"), poisoned_allocations():
        res = pruneattn.attention_stats(q, k, v, stat=stat, num_prefix=num_prefix)
    qd, kd, vd = (t.cpu().double() for t in (q, k, v))
    probs = R.attention_probs(qd, kd)
    a = probs[:, :, 0, num_prefix:]
    torch.testing.assert_close(res.out.cpu().double(), probs @ vd, atol=1e-5, rtol=1e-5)
    ref = R.head_statistic(a, stat)
    torch.testing.assert_close(res.scores.cpu().double(), ref, atol=1e-6 * ref.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(res.head_mean.cpu().double(), a.mean(dim=1), atol=1e-7, rtol=1e-4)
    assert res.scores.dtype == torch.float32


def test_both_backends_select_the_same_tokens(device):
    q, k, v = random_qkv(2, 6, 197, 64, torch.float32, device, seed=3)
    picks = {}
    for kernel in backend.ATTENTION_KERNELS:
        with pruneattn.use_backend("triton"), backend.use_attention_kernel(kernel):
            scores = pruneattn.attention_scores(q, k, v)[1]
        picks[kernel] = torch.topk(scores, 137, dim=1).indices.sort(dim=1).values
    assert torch.equal(picks["fused"], picks["sdpa"])


def test_choice_defaults_to_fused_and_obeys_overrides(tmp_path, monkeypatch):
    q = torch.empty(2, 6, 197, 64)
    monkeypatch.delenv("PRUNEATTN_ATTENTION", raising=False)
    monkeypatch.delenv("PRUNEATTN_CHOICES", raising=False)
    monkeypatch.setattr(backend, "_CHOICES", {})
    assert backend.attention_kernel(q, "cls") == "fused"
    with backend.use_attention_kernel("sdpa"):
        assert backend.attention_kernel(q, "cls") == "sdpa"
        assert backend.attention_kernel(q, "mean") == "fused"  # SDPA gives no row statistics
    monkeypatch.setenv("PRUNEATTN_ATTENTION", "sdpa")
    assert backend.attention_kernel(q, "cls") == "sdpa"
    monkeypatch.setenv("PRUNEATTN_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="PRUNEATTN_ATTENTION"):
        backend.attention_kernel(q, "cls")
    monkeypatch.delenv("PRUNEATTN_ATTENTION")
    table = tmp_path / "choices.json"
    table.write_text(
        '{"choices": [{"device": "cpu", "dtype": "float32", "H": 6, "d": 64, "N": 197, "backend": "sdpa"}]}'
    )
    monkeypatch.setenv("PRUNEATTN_CHOICES", str(table))
    monkeypatch.setattr(backend, "_choices_loaded_from", set())
    assert backend.attention_kernel(q, "cls") == "sdpa"
    assert backend.attention_kernel(torch.empty(2, 6, 198, 64), "cls") == "fused"
    with pytest.raises(ValueError):
        with backend.use_attention_kernel("flash"):
            pass
