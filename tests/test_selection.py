"""Top-k selection, gather and fused token on every path against the reference, with ties and NaN."""
import pytest
import torch

import pruneattn
from pruneattn import reference as R
from pruneattn.validate import MODES, QUERIES, STATS
from helpers import poisoned_allocations, random_qkv, rel_err

CASES = [  # (B, N, C, num_prefix, keep_rate or k)
    (1, 2, 16, 1, 1.0),
    (2, 197, 96, 1, 0.7),
    (3, 50, 40, 2, 0.5),
    (1, 325, 64, 1, 0.3),
    (2, 1026, 24, 2, 0.9),
    (2, 40, 130, 5, 1),
    (1, 33, 8, 0, 0.25),
]


def _select(backend, x, scores, spec, num_prefix, mode, weights):
    kw = dict(k=spec) if isinstance(spec, int) else dict(keep_rate=spec)
    with pruneattn.use_backend(backend), poisoned_allocations():
        return pruneattn.select_tokens(
            x, scores, num_prefix=num_prefix, mode=mode, fuse_weights=weights if mode == "fuse" else None, **kw
        )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_selection_matches_reference(case, backend, ties, mode, device):
    B, N, C, num_prefix, spec = case
    dev = device if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(N)
    x = torch.randn(B, N, C, generator=g)
    P = N - num_prefix
    scores = torch.randint(0, 4, (B, P), generator=g).float() if ties else torch.rand(B, P, generator=g)
    weights = torch.rand(B, P, generator=g)
    kept, idx = _select(backend, x.to(dev), scores.to(dev), spec, num_prefix, mode, weights.to(dev))
    kw = dict(k=spec) if isinstance(spec, int) else dict(keep_rate=spec)
    ref_kept, ref_idx = R.select_tokens(
        x.double(), scores.double(), num_prefix=num_prefix, mode=mode,
        fuse_weights=weights.double() if mode == "fuse" else None, **kw,
    )
    assert idx.dtype == torch.int64 and torch.equal(idx.cpu(), ref_idx)
    assert kept.shape == ref_kept.shape and kept.dtype == x.dtype
    assert rel_err(kept.cpu(), ref_kept) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_strided_tokens_and_low_precision(dtype, device):
    # x is a non-contiguous view (every other channel of a wider buffer): read without a copy.
    base = torch.randn(2, 60, 2 * 48, dtype=dtype, device=device)
    x = base[:, :, ::2]
    scores, weights = torch.rand(2, 59, device=device), torch.rand(2, 59, device=device)
    kept, idx = _select("triton", x, scores, 0.6, 1, "fuse", weights)
    ref_kept, ref_idx = R.select_tokens(x.cpu().double(), scores.cpu().double(), keep_rate=0.6, mode="fuse",
                                        fuse_weights=weights.cpu().double())
    assert torch.equal(idx.cpu(), ref_idx) and rel_err(kept.cpu(), ref_kept) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_all_scores_equal_keeps_first_k(device):
    x = torch.randn(2, 101, 16, device=device)
    kept, idx = _select("triton", x, torch.zeros(2, 100, device=device), 7, 1, "drop", None)
    assert idx.tolist() == [list(range(7))] * 2


def test_kernel_ranks_nan_lowest(device):
    # Only reachable where the host check is skipped (CUDA graph capture, torch.compile).
    from pruneattn.kernels.select import select_topk

    scores = torch.tensor([[0.5, float("nan"), 0.9, float("-inf"), 0.1, float("nan")]], device=device)
    idx, keep = select_topk(scores, 4)
    ref = R.select_k(torch.zeros(1, 7, 1), scores.cpu(), 4, 1, None)[1]
    assert idx.tolist() == ref.tolist() == [[0, 1, 2, 4]]
    assert keep.tolist() == [[1, 1, 1, 0, 1, 0]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_selection_gradient(backend, mode, device):
    dev = device if backend == "triton" else torch.device("cpu")
    x = torch.randn(2, 30, 8, device=dev, requires_grad=True)
    scores, w = torch.rand(2, 29, device=dev), torch.rand(2, 29, device=dev)
    with pruneattn.use_backend(backend):
        kept, _ = pruneattn.select_tokens(x, scores, k=10, mode=mode, fuse_weights=w if mode == "fuse" else None)
    gy = torch.randn_like(kept)
    (grad,) = torch.autograd.grad(kept, x, gy)
    x64 = x.detach().cpu().double().requires_grad_()
    ref, _ = R.select_tokens(x64, scores.cpu().double(), k=10, mode=mode,
                             fuse_weights=w.cpu().double() if mode == "fuse" else None)
    (ref_grad,) = torch.autograd.grad(ref, x64, gy.cpu().double())
    assert rel_err(grad.cpu(), ref_grad) < 1e-6


@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("query", QUERIES)
def test_kernel_pipeline_selects_what_the_reference_selects(stat, query, device):
    """Scores from the kernels, then selection: the kept set equals the reference's wherever the
    reference's k-th and (k+1)-th scores are further apart than the kernel's score error."""
    B, H, N, d = 3, 6, 197, 64
    q, k, v = random_qkv(B, H, N, d, torch.float32, device, seed=7)
    with pruneattn.use_backend("triton"):
        res = pruneattn.attention_stats(q, k, v, stat=stat, query=query)
        x = torch.randn(B, N, 32, device=device)
        _, idx = pruneattn.select_tokens(x, res.scores, keep_rate=0.7)
    qd, kd = q.cpu().double(), k.cpu().double()
    ref_scores = R.head_statistic(R.received_attention(R.attention_probs(qd, kd), query)[:, :, 1:], stat)
    err = (res.scores.cpu().double() - ref_scores).abs().max()
    k_keep = idx.shape[1]
    top = ref_scores.sort(dim=1, descending=True).values
    ref_idx = R.select_k(x.cpu().double(), ref_scores, k_keep, 1, None)[1]
    checked = 0
    for b in range(B):
        if top[b, k_keep - 1] - top[b, k_keep] > 2 * err:
            assert torch.equal(idx[b].cpu(), ref_idx[b])
            checked += 1
    assert checked >= 1, "no image had a clear top-k gap; the test checked nothing"
