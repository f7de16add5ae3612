"""The reference against independent, hand-checkable definitions (numpy, explicit loops)."""
import math

import numpy as np
import pytest
import torch

from pruneattn import reference as R
from pruneattn.validate import QUERIES, STATS, num_kept


def _numpy_scores(q, k, stat, query, num_prefix):
    q, k = q.numpy(), k.numpy()
    B, H, N, d = q.shape
    logits = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    a = attn[:, :, 0, :] if query == "cls" else attn.mean(2)
    a = a[:, :, num_prefix:]
    if stat == "var":
        return a.var(axis=1)
    if stat == "mean":
        return a.mean(axis=1)
    med = np.median(a, axis=1, keepdims=True)  # numpy averages the two middle values
    return np.median(np.abs(a - med), axis=1)


@pytest.mark.parametrize("H", [1, 2, 3, 6, 12])
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("query", QUERIES)
def test_scores_match_numpy(H, stat, query):
    g = torch.Generator().manual_seed(H)
    q, k, v = (torch.randn(2, H, 11, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, scores = R.attention_scores(q, k, v, stat=stat, query=query, num_prefix=2)
    assert scores.dtype == torch.float32  # the spec: float32 whatever the input
    np.testing.assert_allclose(scores.numpy(), _numpy_scores(q, k, stat, query, 2), rtol=1e-6, atol=1e-12)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(out, attn @ v)


def test_mad_even_heads_uses_mean_of_middle_values():
    # 4 heads, received attention a = [0.1, 0.2, 0.4, 0.8]: median 0.3, |a - m| = [.2,.1,.1,.5] -> MAD 0.15.
    a = torch.tensor([0.1, 0.2, 0.4, 0.8], dtype=torch.float64).view(1, 4, 1)
    assert R.head_statistic(a, "mad").item() == pytest.approx(0.15)
    assert R.head_statistic(a, "var").item() == pytest.approx(np.var([0.1, 0.2, 0.4, 0.8]))


def test_scores_are_float32_for_low_precision_inputs():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float16)
    out, scores = R.attention_scores(q, q, q)
    assert out.dtype == torch.float16 and scores.dtype == torch.float32 and scores.shape == (1, 4)


@pytest.mark.parametrize(
    "P, rate, expected", [(196, 0.7, 138), (138, 0.7, 97), (97, 0.7, 68), (10, 0.7, 7), (196, 0.5, 98), (3, 0.01, 1)]
)
def test_num_kept_rounding(P, rate, expected):
    assert num_kept(P, keep_rate=rate) == expected


def test_select_ties_go_to_lower_index_and_order_is_kept():
    x = torch.arange(1 * 8 * 2, dtype=torch.float64).view(1, 8, 2)
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0, 3.0]], dtype=torch.float64)
    kept, idx = R.select_tokens(x, scores, k=3)
    assert idx.tolist() == [[1, 2, 4]]  # four 3.0s, the three lowest indices win
    torch.testing.assert_close(kept, x[:, [0, 2, 3, 5]])


def test_fuse_is_renormalized_weighted_average_of_dropped():
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.1, 0.2, 0.3, 0.6]], dtype=torch.float64)
    kept, idx = R.select_tokens(x, scores, k=2, mode="fuse", fuse_weights=w)
    assert idx.tolist() == [[0, 2]]
    dropped = [1, 3, 4]  # patch indices; tokens are patch + 1
    expected = sum(w[0, j] * x[0, j + 1] for j in dropped) / sum(w[0, j] for j in dropped)
    torch.testing.assert_close(kept[0, -1], expected)
    torch.testing.assert_close(kept[0, :3], x[0, [0, 1, 3]])


def test_fuse_with_nothing_dropped_is_zero():
    x = torch.randn(2, 5, 3)
    kept, _ = R.select_tokens(x, torch.rand(2, 4), keep_rate=1.0, mode="fuse", fuse_weights=torch.rand(2, 4))
    assert kept.shape == (2, 6, 3) and torch.count_nonzero(kept[:, -1]) == 0
