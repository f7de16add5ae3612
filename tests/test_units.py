"""Selection units (``attention_stats(..., unit=g)``): merged tokens scored as one.

Each path (Triton kernels under the interpreter without a GPU, the CPU path, the reference) against
an independent float64 truth written here: the full softmax, received attention per head summed
over each run of g patches by a Python loop, then the statistic over heads. Padded units are
NaN-poisoned; outputs are poisoned before they are written.
"""
import pytest
import torch

import pruneattn
from pruneattn import reference as R
from pruneattn.validate import STATS
from helpers import poisoned_allocations, rel_err, tol

# (B, H, N, d, num_prefix, unit, real units per image or None)
CASES = [
    (2, 3, 16, 16, 0, 4, None),
    (1, 16, 37, 16, 1, 4, None),
    (3, 6, 24, 80, 0, 4, (1, 3, 6)),
    (2, 12, 19, 24, 1, 2, (9, 4)),
    (2, 1, 18, 16, 0, 9, (2, 1)),
]


def _inputs(B, H, N, d, num_prefix, unit, real_units, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) * 1.5 for _ in range(3))
    valid = None
    if real_units is not None:
        lengths = torch.tensor([num_prefix + unit * u for u in real_units])
        valid = torch.arange(N)[None, :] < lengths[:, None]
        for t in (q, k, v):
            t.masked_fill_(~valid[:, None, :, None], float("nan"))
    return (*(t.to(dtype) for t in (q, k, v)), valid)


def _truth(q, k, v, stat, query, num_prefix, unit, valid):
    """Independent float64 scores per unit: plain softmax, a loop over the units, the statistic."""
    q, k = q.double(), k.double()
    B, H, N, _ = q.shape
    logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    if query == "cls":
        rec = attn[:, :, 0]
    else:
        rows = torch.ones(B, N, dtype=torch.bool) if valid is None else valid
        rec = torch.stack([attn[b][:, rows[b]].sum(dim=1) / rows[b].sum() for b in range(B)])
    U = (N - num_prefix) // unit
    a = torch.zeros(B, H, U, dtype=torch.float64)
    for u in range(U):
        for j in range(unit):
            a[:, :, u] += rec[:, :, num_prefix + u * unit + j]
    if stat == "var":
        score = ((a - a.mean(1, keepdim=True)) ** 2).mean(1)
    elif stat == "mean":
        score = a.mean(1)
    else:
        med = a.quantile(0.5, dim=1, keepdim=True)
        score = (a - med).abs().quantile(0.5, dim=1)
    return score, a.mean(1)


# query="cls" needs a class token (num_prefix >= 1)
QUERY_CASES = [(c, q) for c in CASES for q in ("cls", "mean") if q == "mean" or c[4] >= 1]


@pytest.mark.parametrize("backend", ["triton", "cpu", "reference"])
@pytest.mark.parametrize("case, query", QUERY_CASES, ids=str)
def test_unit_scores_match_independent_truth(case, query, backend, device):
    B, H, N, d, num_prefix, unit, real_units = case
    dtypes = {"triton": [torch.float32, torch.float16], "cpu": [torch.float32, torch.bfloat16],
              "reference": [torch.float64]}[backend]
    dev = device if backend == "triton" else torch.device("cpu")
    for dtype in dtypes:
        q, k, v, valid = _inputs(B, H, N, d, num_prefix, unit, real_units, dtype, seed=N + H)
        for stat in STATS:
            with pruneattn.use_backend(backend), poisoned_allocations():
                res = pruneattn.attention_stats(
                    *(t.to(dev) for t in (q, k, v)), stat=stat, query=query, num_prefix=num_prefix, unit=unit,
                    valid=None if valid is None else valid.to(dev),
                )
            score, mean = _truth(q, k, v, stat, query, num_prefix, unit, valid)
            assert res.scores.shape == (B, (N - num_prefix) // unit) and res.scores.dtype == torch.float32
            real = torch.ones_like(score, dtype=torch.bool) if valid is None else valid[:, num_prefix::unit]
            got, hm = res.scores.cpu(), res.head_mean.cpu()
            assert torch.isnan(got[~real]).all() and (hm[~real] == 0).all()
            atol = 1e-3 * float(score[real].norm()) + 1e-12
            assert rel_err(got[real], score[real], atol=atol) < tol(dtype) * 10, (stat, dtype)
            assert rel_err(hm[real], mean[real]) < tol(dtype), (stat, dtype)
            ref_out = R.attention_stats(q.double(), k.double(), v.double(), query=query, num_prefix=num_prefix,
                                        valid=valid)[0]
            rows = slice(None) if valid is None else valid[:, None, :, None].expand_as(ref_out)
            assert rel_err(res.out.cpu()[rows], ref_out[rows]) < tol(dtype)


def test_unit_one_is_patch_scores():
    q, k, v, _ = _inputs(2, 6, 17, 16, 1, 1, None, torch.float32, seed=0)
    a = pruneattn.attention_stats(q, k, v, unit=1)
    b = pruneattn.attention_stats(q, k, v)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=0)


def test_unit_refusals():
    q, k, v, _ = _inputs(1, 2, 10, 8, 0, 1, None, torch.float32, seed=0)
    with pytest.raises(ValueError, match="must divide the 9 patches"):
        pruneattn.attention_stats(q, k, v, unit=4)
    with pytest.raises(ValueError, match="unit must be an int >= 1"):
        pruneattn.attention_stats(q, k, v, unit=0)
    with pytest.raises(ValueError, match="unit must be an int >= 1"):
        pruneattn.attention_stats(q, k, v, unit=2.0, query="mean", num_prefix=0)
    valid = torch.ones(1, 10, dtype=torch.bool)
    valid[0, 7:] = False  # half of the last unit of 2 is padding
    with pytest.raises(ValueError, match="whole units of 2"):
        pruneattn.attention_stats(q, k, v, unit=2, query="mean", num_prefix=0, valid=valid)


def test_unit_scores_compile_and_backward(cpu_backend):
    q, k, v, _ = _inputs(2, 4, 16, 8, 0, 4, None, torch.float32, seed=2)
    q.requires_grad_(True)
    run = torch.compile(lambda q, k, v: pruneattn.attention_stats(q, k, v, query="mean", num_prefix=0, unit=4),
                        backend="eager", fullgraph=True)
    res = run(q, k, v)
    assert res.scores.shape == (2, 4)
    res.out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
