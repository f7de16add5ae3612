"""Padding masks (images of different sizes padded to one length) on every path.

Each path (the Triton kernels, under the interpreter without a GPU; the CPU path; the reference) is
checked against the float64 reference, and the reference itself against an independent definition:
the real tokens of a padded image give what the same image gives alone, unpadded. Padding is
poisoned with NaN (it must not reach any real result) and outputs are poisoned before they are
written (an unwritten element fails).
"""
import math

import pytest
import torch

import pruneattn
from pruneattn import reference as R
from pruneattn.ops import valid_after
from pruneattn.validate import STATS
from helpers import poisoned_allocations, rel_err, tol

# (B, H, N, d, real tokens per image): one real token, odd counts, a full image, batch 1, H in 1..16.
RAGGED = [
    (3, 3, 17, 16, (1, 9, 17)),
    (2, 6, 65, 32, (65, 30)),
    (1, 1, 9, 24, (5,)),
    (2, 12, 33, 16, (33, 2)),
    (2, 16, 20, 64, (11, 20)),
]
BACKENDS = ["triton", "cpu", "reference"]


def _ragged(B, H, N, d, lengths, dtype, seed, prefix_mask=True):
    """Fresh q, k, v (B, H, N, d) with NaN at the padded tokens, and the (B, N) mask of real tokens.
    ``prefix_mask=False``: the real tokens are not a prefix (a hole in the middle, as a padded 2-D
    grid flattened row by row gives)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) * 1.5 for _ in range(3))
    valid = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    if not prefix_mask:
        valid = valid.roll(shifts=(N - max(lengths)) // 2 + 1, dims=1)
        valid[:, 0] = True  # the class token is real
    for t in (q, k, v):
        t.masked_fill_(~valid[:, None, :, None], float("nan"))
    return (*(t.to(dtype) for t in (q, k, v)), valid)


def _alone(q, k, v, valid, b, **kw):
    """The reference on image b alone: its real tokens only, no mask."""
    keep = valid[b]
    return R.attention_stats(q[b : b + 1, :, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep], **kw)


@pytest.mark.parametrize("query", ["cls", "mean"])
@pytest.mark.parametrize("prefix_mask", [True, False], ids=["lengths", "holes"])
def test_reference_equals_each_image_alone(query, prefix_mask):
    q, k, v, valid = _ragged(3, 6, 21, 8, (1, 12, 21), torch.float64, seed=1, prefix_mask=prefix_mask)
    for stat in STATS:
        out, scores, mean = R.attention_stats(q, k, v, stat=stat, query=query, valid=valid)
        for b in range(3):
            keep = valid[b]
            assert torch.isnan(scores[b][~keep[1:]]).all() and (mean[b][~keep[1:]] == 0).all()
            if keep.sum() == 1:  # the class token alone: it sees itself only
                torch.testing.assert_close(out[b, :, 0], v[b, :, 0])
                continue
            o1, s1, m1 = _alone(q, k, v, valid, b, stat=stat, query=query)
            torch.testing.assert_close(out[b][:, keep], o1[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(scores[b][keep[1:]], s1[0].double().float(), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(mean[b][keep[1:]], m1[0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("query", ["cls", "mean"])
@pytest.mark.parametrize("case", RAGGED, ids=str)
def test_masked_attention_matches_reference(case, query, backend, device):
    B, H, N, d, lengths = case
    if backend == "triton":  # the interpreter is slow: each dtype with one of the two mask kinds
        runs = [(torch.float32, True), (torch.float16, False)]
    else:
        runs = [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True)]
    for dtype, prefix_mask in runs:
        if True:
            q, k, v, valid = _ragged(B, H, N, d, lengths, dtype, seed=N + H, prefix_mask=prefix_mask)
            dev = device if backend == "triton" else torch.device("cpu")
            qd, kd, vd = (t.double() for t in (q, k, v))
            for stat in STATS:
                with pruneattn.use_backend(backend), poisoned_allocations():
                    res = pruneattn.attention_stats(*(t.to(dev) for t in (q, k, v)), stat=stat, query=query,
                                                    valid=valid.to(dev))
                acc = R.attention_probs(qd, kd, valid=valid)
                a = R.received_attention(acc, query, valid)[:, :, 1:]
                real = valid[:, 1:]
                ref_out = acc @ vd.masked_fill(~valid[:, None, :, None], 0.0)
                rows = valid[:, None, :, None].expand_as(ref_out)
                assert rel_err(res.out.cpu()[rows], ref_out[rows]) < tol(dtype), (stat, dtype)
                ref_scores = R.head_statistic(a, stat)
                assert torch.isnan(res.scores.cpu()[~real]).all() and (res.head_mean.cpu()[~real] == 0).all()
                scale = 1e-3 * float(a[real.unsqueeze(1).expand_as(a)].norm())
                assert rel_err(res.scores.cpu()[real], ref_scores[real], atol=scale) < tol(dtype), (stat, dtype)
                assert rel_err(res.head_mean.cpu()[real], a.mean(1)[real]) < tol(dtype)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("num_prefix, query", [(0, "mean"), (5, "cls"), (3, "mean")])
def test_masked_prefix_tokens(backend, num_prefix, query, device):
    q, k, v, valid = _ragged(2, 3, 23, 16, (num_prefix + 1, 23), torch.float32, seed=7)
    dev = device if backend == "triton" else torch.device("cpu")
    with pruneattn.use_backend(backend), poisoned_allocations():
        res = pruneattn.attention_stats(*(t.to(dev) for t in (q, k, v)), query=query, num_prefix=num_prefix,
                                        valid=valid.to(dev))
    ref = R.attention_stats(q.double(), k.double(), v.double(), query=query, num_prefix=num_prefix, valid=valid)
    real = valid[:, num_prefix:]
    assert rel_err(res.scores.cpu()[real], ref[1][real], atol=1e-9) < 1e-4
    assert torch.isnan(res.scores.cpu()[~real]).all()


def test_all_real_mask_equals_no_mask(device):
    q, k, v, valid = _ragged(2, 6, 37, 32, (37, 37), torch.float32, seed=3)
    for backend in ("triton", "cpu"):
        dev = device if backend == "triton" else torch.device("cpu")
        for query in ("cls", "mean"):
            with pruneattn.use_backend(backend):
                a = pruneattn.attention_stats(*(t.to(dev) for t in (q, k, v)), query=query, valid=valid.to(dev))
                b = pruneattn.attention_stats(*(t.to(dev) for t in (q, k, v)), query=query)
            torch.testing.assert_close(a.out, b.out, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-9)


def _select_alone(x, scores, valid, b, count, num_prefix, weights):
    """Image b's selection computed on its real tokens only, with its own k: the independent truth."""
    keep = valid[b]
    xs, ss = x[b : b + 1, keep], scores[b : b + 1, keep[num_prefix:]]
    real_idx = keep[num_prefix:].nonzero().squeeze(1)
    if count == 0:
        return xs[0, :num_prefix], real_idx[:0]
    mode = "drop" if weights is None else "fuse"
    w = None if weights is None else weights[b : b + 1, keep[num_prefix:]]
    with pruneattn.use_backend("reference"):
        kept, idx = pruneattn.select_tokens(xs, ss, k=count, num_prefix=num_prefix, mode=mode, fuse_weights=w)
    return kept[0], real_idx[idx[0]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["drop", "fuse"])
def test_masked_selection_equals_each_image_alone(mode, backend, device):
    B, N, C, num_prefix = 4, 19, 12, 1
    g = torch.Generator().manual_seed(5)
    lengths = (1, 2, 10, 19)
    valid = torch.arange(N)[None, :] < torch.tensor(lengths)[:, None]
    valid[2] = valid[2].roll(4)
    valid[2, 0] = True
    x = torch.randn(B, N, C, generator=g).masked_fill(~valid[:, :, None], float("nan"))
    scores = torch.randn(B, N - num_prefix, generator=g).round(decimals=1)  # ties
    scores[3, 4] = float("nan")
    scores = scores.masked_fill(~valid[:, num_prefix:], float("nan"))
    weights = torch.rand(B, N - num_prefix, generator=g) if mode == "fuse" else None
    dev = device if backend == "triton" else torch.device("cpu")
    for spec in ({"keep_rate": 0.5}, {"keep_rate": 0.3}, {"k": 4}):
        with pruneattn.use_backend(backend), poisoned_allocations():
            kept, idx = pruneattn.select_tokens(
                x.to(dev), scores.to(dev), num_prefix=num_prefix, mode=mode,
                fuse_weights=None if weights is None else weights.to(dev), valid=valid.to(dev), **spec)
        kept, idx = kept.cpu(), idx.cpu()
        real = valid[:, num_prefix:].sum(1).tolist()
        if "k" in spec:
            counts = [min(spec["k"], p) for p in real]
        else:  # ceil(rate * P_b), at least 1; 0 without real patches
            counts = [max(1, math.ceil(round(spec["keep_rate"] * p, 9))) if p else 0 for p in real]
        width = max(counts)
        assert idx.shape == (B, width) and kept.shape == (B, num_prefix + width + (mode == "fuse"), C)
        for b in range(B):
            want_rows, want_idx = _select_alone(x, scores, valid, b, counts[b], num_prefix, weights)
            n = counts[b]
            assert idx[b, :n].tolist() == want_idx.tolist(), (spec, b)
            assert (idx[b, n:] == -1).all()
            torch.testing.assert_close(kept[b, : num_prefix + n], want_rows[: num_prefix + n])
            assert (kept[b, num_prefix + n : num_prefix + width] == 0).all()
            if mode == "fuse":  # no real patch: nothing to fuse, a zero token
                fused = want_rows[-1] if n else torch.zeros(C)
                torch.testing.assert_close(kept[b, -1], fused, rtol=1e-5, atol=1e-6)
        mask = valid_after(valid, idx, num_prefix, fused=mode == "fuse")
        assert mask.shape == kept.shape[:2] and mask.sum(1).tolist() == [
            num_prefix + c + (mode == "fuse") for c in counts]


def test_masked_selection_gradient(cpu_backend):
    g = torch.Generator().manual_seed(2)
    valid = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    x = torch.randn(2, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(2, 6, generator=g).masked_fill(~valid[:, 1:], float("nan"))
    weights = torch.rand(2, 6, generator=g, dtype=torch.float64)
    for mode in ("drop", "fuse"):
        w = weights if mode == "fuse" else None
        fn = lambda t: pruneattn.select_tokens(t, scores, keep_rate=0.5, mode=mode, fuse_weights=w, valid=valid)[0]  # noqa: E731
        torch.autograd.gradcheck(fn, (x,))
        (grad,) = torch.autograd.grad(fn(x).sum(), x)
        assert (grad[1, 3:] == 0).all()  # padding gets no gradient, though its output rows exist


def test_masked_attention_gradient_matches_reference(cpu_backend):
    q, k, v, valid = _ragged(2, 3, 11, 8, (11, 6), torch.float64, seed=4)
    q, k, v = (t.nan_to_num(0.0).requires_grad_(True) for t in (q, k, v))
    out = pruneattn.attention_stats(q, k, v, valid=valid).out
    ref = R.attention_probs(q, k, valid=valid) @ v.masked_fill(~valid[:, None, :, None], 0.0)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad, error, match", [
    (torch.ones(2, 9, dtype=torch.int64), TypeError, "bool"),
    (torch.ones(2, 8, dtype=torch.bool), ValueError, "shape"),
    (torch.tensor([[False] + [True] * 8] * 2), ValueError, "prefix"),
    ("mask", TypeError, "torch.Tensor"),
])
def test_bad_masks_are_refused(bad, error, match):
    q = torch.randn(2, 3, 9, 8)
    with pytest.raises(error, match=match):
        pruneattn.attention_stats(q, q, q, valid=bad)
    with pytest.raises(error, match=match):
        pruneattn.select_tokens(q[:, 0], q[:, 0, 1:, 0], keep_rate=0.5, valid=bad)


def test_image_without_real_tokens_is_refused():
    q = torch.randn(2, 3, 9, 8)
    valid = torch.zeros(2, 9, dtype=torch.bool)
    valid[0] = True
    with pytest.raises(ValueError, match="at least one real token"):
        pruneattn.attention_stats(q, q, q, query="mean", num_prefix=0, valid=valid)


def test_masked_ops_compile():
    q, k, v, valid = _ragged(2, 3, 16, 8, (16, 9), torch.float32, seed=6)
    q, k, v = (t.nan_to_num(0.0) for t in (q, k, v))
    x = torch.randn(2, 16, 24)

    def run(q, k, v, x, valid):
        res = pruneattn.attention_stats(q, k, v, valid=valid)
        return pruneattn.select_tokens(x, res.scores, keep_rate=0.5, valid=valid)

    with pruneattn.use_backend("cpu"):
        eager = run(q, k, v, x, valid)
        compiled = torch.compile(run)(q, k, v, x, valid)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_mask_as_a_strided_view(backend, device):
    """A mask read off a model's (B, 1, N, N) attention mask is a strided view: the same results."""
    q, k, v, valid = _ragged(2, 3, 19, 16, (19, 7), torch.float32, seed=8)
    square = valid[:, None, None, :].expand(2, 1, 19, 19).clone()
    view = square[:, 0, 0, :]
    assert not view.is_contiguous()
    dev = device if backend == "triton" else torch.device("cpu")
    x = torch.randn(2, 19, 8)
    with pruneattn.use_backend(backend):
        a = pruneattn.attention_stats(*(t.to(dev) for t in (q, k, v)), query="mean", valid=view.to(dev))
        b = pruneattn.attention_stats(*(t.to(dev) for t in (q, k, v)), query="mean", valid=valid.to(dev))
        kept_a = pruneattn.select_tokens(x.to(dev), a.scores, keep_rate=0.5, valid=view.to(dev))
        kept_b = pruneattn.select_tokens(x.to(dev), b.scores, keep_rate=0.5, valid=valid.to(dev))
    torch.testing.assert_close(a.scores, b.scores, equal_nan=True)
    assert torch.equal(kept_a[1], kept_b[1]) and torch.equal(kept_a[0], kept_b[0])
