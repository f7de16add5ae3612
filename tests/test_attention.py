"""Attention output and scores of every path against the float64 reference, outputs poisoned first.

Under TRITON_INTERPRET=1 (no GPU) the "triton" backend runs the Triton kernels on the CPU.
"""
import pytest
import torch

import pruneattn
from pruneattn import reference as R
from pruneattn.validate import QUERIES, STATS
from helpers import poisoned_allocations, random_qkv, rel_err, tol

# (B, H, N, d): odd N, N not a multiple of any block, N = 1 + 196 and 1 + 324, batch 1, H in 1..16.
SHAPES = [
    (1, 1, 2, 32),
    (2, 3, 17, 64),
    (1, 6, 197, 64),
    (2, 12, 65, 32),
    (1, 16, 100, 64),
    (1, 3, 325, 64),
    (3, 2, 33, 128),
]
INTERPRETER_DTYPES = [torch.float32, torch.float16]


def _check(backend, shape, dtype, device, query, num_prefix=1, packed=True):
    B, H, N, d = shape
    q, k, v = random_qkv(B, H, N, d, dtype, device, packed=packed, seed=N * H)
    qd, kd, vd = (t.detach().cpu().double() for t in (q, k, v))  # the same rounded inputs, in fp64
    for stat in STATS:
        with pruneattn.use_backend(backend), poisoned_allocations():
            res = pruneattn.attention_stats(q, k, v, stat=stat, query=query, num_prefix=num_prefix)
        ref_out, _ = R.attention_scores(qd, kd, vd, stat=stat, query=query, num_prefix=num_prefix)
        ref_a = R.received_attention(R.attention_probs(qd, kd), query)[:, :, num_prefix:]
        ref_scores = R.head_statistic(ref_a, stat)  # float64, not rounded to float32
        assert res.out.shape == (B, H, N, d) and res.out.dtype == dtype
        assert res.scores.shape == (B, N - num_prefix) and res.scores.dtype == torch.float32
        assert torch.isfinite(res.out).all() and torch.isfinite(res.scores).all()
        assert rel_err(res.out, ref_out) < tol(dtype), stat
        # Scores of a single head's var / mad are exactly zero: bound them against the scale of a.
        assert rel_err(res.scores, ref_scores, atol=1e-3 * float(ref_a.norm())) < tol(dtype), stat
        assert rel_err(res.head_mean, ref_a.mean(1)) < tol(dtype)


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("dtype", INTERPRETER_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_attention_matches_reference(shape, dtype, query, device):
    _check("triton", shape, dtype, device, query)


@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_path_matches_reference(shape, dtype, query):
    _check("cpu", shape, dtype, torch.device("cpu"), query)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("num_prefix, query", [(2, "cls"), (5, "cls"), (0, "mean"), (4, "mean")])
def test_prefix_tokens(backend, num_prefix, query, device):
    dev = device if backend == "triton" else torch.device("cpu")
    _check(backend, (2, 3, 40, 32), torch.float32, dev, query, num_prefix=num_prefix, packed=False)


def test_single_token_mean_query(device):
    _check("triton", (2, 3, 1, 64), torch.float32, device, "mean", num_prefix=0)


def test_explicit_scale(device):
    q, k, v = random_qkv(1, 3, 30, 32, torch.float32, device)
    with pruneattn.use_backend("triton"):
        out, scores = pruneattn.attention_scores(q, k, v, scale=0.3)
    ro, rs = R.attention_scores(*(t.cpu().double() for t in (q, k, v)), scale=0.3)
    assert rel_err(out, ro) < 1e-5 and rel_err(scores, rs) < 1e-5


def test_identical_heads_give_zero_diversity(device):
    # Every head sees the same q and k: var and MAD over heads are exactly zero for every patch.
    q1, k1, v = random_qkv(2, 1, 50, 32, torch.float32, device, packed=False)
    q, k = q1.expand(2, 4, 50, 32), k1.expand(2, 4, 50, 32)
    with pruneattn.use_backend("triton"):
        for stat in ("var", "mad"):
            _, scores = pruneattn.attention_scores(q, k, v.expand(2, 4, 50, 32), stat=stat)
            assert torch.count_nonzero(scores) == 0


def test_scores_carry_no_gradient(device):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 9, 32, torch.float32, device, packed=False))
    with pruneattn.use_backend("triton"):
        res = pruneattn.attention_stats(q, k, v)
    assert res.out.requires_grad and not res.scores.requires_grad and not res.head_mean.requires_grad


@pytest.mark.parametrize("query", QUERIES)
def test_long_sequence(query, device):
    # N = 1024 + 1: many key blocks and a last block holding a single token.
    q, k, v = random_qkv(1, 2, 1025, 32, torch.float32, device, seed=11)
    with pruneattn.use_backend("triton"), poisoned_allocations():
        out, scores = pruneattn.attention_scores(q, k, v, stat="mad", query=query)
    qd, kd, vd = (t.cpu().double() for t in (q, k, v))
    attn = R.attention_probs(qd, kd)
    a = R.received_attention(attn, query)[:, :, 1:]
    assert rel_err(out, attn @ vd) < 1e-5
    assert rel_err(scores, R.head_statistic(a, "mad"), atol=1e-3 * float(a.norm())) < 1e-5
