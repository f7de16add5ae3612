"""Bad input raises a clear error naming the argument, before any work, on every path."""
import pytest
import torch

import pruneattn
from pruneattn import reference as R

QKV = lambda *shape, dtype=torch.float32: [torch.randn(*shape, dtype=dtype) for _ in range(3)]  # noqa: E731


@pytest.fixture(params=["public", "reference"])
def ops(request):
    return pruneattn if request.param == "public" else R


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(stat="median"), ValueError, "stat"),
        (dict(query="row"), ValueError, "query"),
        (dict(num_prefix=7), ValueError, "num_prefix"),
        (dict(num_prefix=-1), ValueError, "num_prefix"),
        (dict(num_prefix=1.0), ValueError, "num_prefix"),
        (dict(num_prefix=0), ValueError, "num_prefix must be >= 1"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
    ],
)
def test_attention_bad_arguments(ops, kwargs, exc, match):
    q, k, v = QKV(1, 2, 7, 32)
    with pytest.raises(exc, match=match):
        ops.attention_scores(q, k, v, **kwargs)


def test_attention_bad_tensors(ops):
    q, k, v = QKV(1, 2, 7, 32)
    with pytest.raises(ValueError, match="4 dimensions"):
        ops.attention_scores(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="same shape"):
        ops.attention_scores(q, k[:, :, :5], v)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.attention_scores(q, k.double(), v)
    with pytest.raises(TypeError, match="float16, bfloat16"):
        ops.attention_scores(q.int(), k.int(), v.int())
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ops.attention_scores(q.numpy(), k, v)
    with pytest.raises(ValueError, match="one device"):
        ops.attention_scores(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="empty"):
        ops.attention_scores(*QKV(0, 2, 7, 32))


def test_kernel_limits_are_clear_errors():
    with pruneattn.use_backend("triton"):
        q, k, v = QKV(1, 2, 7, 8)
        with pytest.raises(ValueError, match="head dims 16 to 256, got d = 8"):
            pruneattn.attention_scores(q, k, v)
        q, k, v = QKV(1, 2, 7, 32, dtype=torch.float64)
        with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
            pruneattn.attention_scores(q, k, v)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one"),
        (dict(keep_rate=0.5, k=2), "exactly one"),
        (dict(keep_rate=0.0), "keep_rate"),
        (dict(keep_rate=1.5), "keep_rate"),
        (dict(keep_rate=float("nan")), "keep_rate"),
        (dict(k=0), "k must be"),
        (dict(k=10), r"k must be an int in \[1, 9\]"),
        (dict(k=2.0), "k must be"),
        (dict(k=2, mode="merge"), "mode"),
        (dict(k=2, mode="fuse"), "fuse_weights"),
        (dict(k=2, fuse_weights=torch.rand(2, 9)), "only used with mode='fuse'"),
        (dict(k=2, mode="fuse", fuse_weights=torch.rand(2, 8)), "fuse_weights must have shape"),
        (dict(k=2, mode="fuse", fuse_weights=-torch.rand(2, 9)), "non-negative"),
        (dict(k=2, num_prefix=10), "num_prefix"),
    ],
)
def test_select_bad_arguments(ops, kwargs, match):
    x, scores = torch.randn(2, 10, 4), torch.randn(2, 9)
    with pytest.raises(ValueError, match=match):
        ops.select_tokens(x, scores, **kwargs)


def test_keep_rate_of_wrong_type(ops):
    for bad in (True, "0.5", [0.5]):
        with pytest.raises(TypeError, match="keep_rate must be a number"):
            ops.select_tokens(torch.randn(2, 10, 4), torch.randn(2, 9), keep_rate=bad)


def test_select_bad_tensors(ops):
    x, scores = torch.randn(2, 10, 4), torch.randn(2, 9)
    with pytest.raises(ValueError, match="scores must have shape"):
        ops.select_tokens(x, scores[:, :8], k=2)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        ops.select_tokens(x[0], scores, k=2)
    with pytest.raises(ValueError, match="device"):
        ops.select_tokens(x, scores.to("meta"), k=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_and_weights_are_values_not_errors(ops, bad):
    """Values are never an argument error: NaN ranks as -inf, a non-finite dropped weight gives a
    NaN fused token, the same on every path and device (docs/semantics.md, "Non-finite values")."""
    x, scores, w = torch.randn(2, 10, 4), torch.randn(2, 9), torch.rand(2, 9)
    scores[1, 3] = bad
    kept, idx = ops.select_tokens(x, scores, k=2)
    ranked = torch.where(torch.isnan(scores), float("-inf"), scores).sort(dim=1, descending=True, stable=True)
    assert torch.equal(idx, ranked.indices[:, :2].sort(dim=1).values)
    if bad > 0 or bad != bad:  # -inf is a negative weight: refused (below)
        w[0, 5] = bad
        kept, _ = ops.select_tokens(x, -torch.arange(9.0).expand(2, 9), k=2, mode="fuse", fuse_weights=w)
        assert torch.isfinite(kept[1]).all() and torch.isfinite(kept[0, :-1]).all()
        assert torch.isnan(kept[0, -1]).all()


def test_negative_fuse_weights_raise_on_cpu_tensors():
    w = torch.rand(2, 9)
    w[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="non-negative"):
        pruneattn.select_tokens(torch.randn(2, 10, 4), torch.randn(2, 9), k=2, mode="fuse", fuse_weights=w)


def test_nan_in_attention_inputs_reaches_the_scores_and_the_output():
    q, k, v = QKV(1, 2, 9, 32)
    k[0, 1, 4, 0] = float("nan")
    out, scores = pruneattn.attention_scores(q, k, v)
    assert torch.isnan(scores).all() and torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        with pruneattn.use_backend("cuda"):
            pass
