"""Hard inputs: non-finite values, overflowing weights, float64, half precision, partial forwards,
tracing, double backward and bad arguments. Every path is held to the reference and to the rules in
docs/semantics.md ("Non-finite values")."""
from __future__ import annotations

import itertools

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import pruneattn
from helpers import rel_err
from model_reference import one_thread  # noqa: F401 (autouse fixture)
from pruneattn import reference as R
from pruneattn.patch.prune import prune_tokens
from pruneattn.patch.state import BlockConfig, Plan, scoped
from pruneattn.ops import AttentionStats
from pruneattn.validate import QUERIES, STATS

NAN, INF = float("nan"), float("inf")


def tiny(seed: int = 0, **kw) -> VisionTransformer:
    torch.manual_seed(seed)
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=4) | kw
    return VisionTransformer(**kw).eval()


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def qkv(B: int, H: int, N: int, d: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3)]


def same_finite(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` are non-finite at the same places."""
    return torch.equal(torch.isfinite(a.cpu()), torch.isfinite(b.cpu()))


def stats(backend: str, q, k, v, **kw) -> AttentionStats:
    with pruneattn.use_backend(backend):
        return pruneattn.attention_stats(q, k, v, **kw)


# ----------------------------------------------------------------------------- rule 1: NaN / inf in q, k, v


def _poisoned(where: str, value: float, row: int, B=2, H=2, N=9, d=16, dtype=torch.float32, seed=0):
    q, k, v = qkv(B, H, N, d, dtype, seed)
    {"q": q, "k": k, "v": v}[where][1, 0, row, 3] = value
    return q, k, v


def _check_against_reference(backend, q, k, v, query):
    num_prefix = 1 if query == "cls" else 0
    kw = dict(stat="var", query=query, num_prefix=num_prefix)
    ref, got = stats("reference", q, k, v, **kw), stats(backend, q, k, v, **kw)
    for name, a, b in zip(AttentionStats._fields, got, ref):
        assert same_finite(a, b), (name, (~torch.isfinite(a)).sum().item(), (~torch.isfinite(b)).sum().item())
        ok = torch.isfinite(b)
        tol = 1e-4 if q.dtype == torch.float32 else 2e-2
        assert rel_err(a.cpu()[ok], b[ok], atol=1e-6) < tol, name
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N", [1, 2, 3, 5, 9, 33])
def test_cpu_path_non_finite_like_reference(N, dtype):
    """The CPU path (SDPA's fused kernel) follows the reference's float32 softmax on NaN / inf inputs."""
    cases = itertools.product("qkv", [NAN, INF, -INF], sorted({0, N // 2, N - 1}), QUERIES)
    for where, value, row, query in cases:
        if query == "cls" and N == 1:
            continue
        q, k, v = _poisoned(where, value, row, N=N, dtype=dtype)
        _check_against_reference("cpu", q, k, v, query)


def test_nan_in_a_query_row_reaches_its_output_row():
    """The fused CPU SDPA kernel returns zeros for a short all-NaN row; the output must show NaN."""
    for row in (0, 1):
        q, k, v = _poisoned("q", NAN, row, N=2)
        with pruneattn.use_backend("cpu"):
            out, scores = pruneattn.attention_scores(q, k, v, query="mean", num_prefix=0)
        assert torch.isnan(out[1, 0, row]).all() and torch.isfinite(out[1, 0, 1 - row]).all()
        assert torch.isnan(scores[1]).all() and torch.isfinite(scores[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [2, 33])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_kernels_non_finite_like_reference(where, N, dtype, device):
    for value, query in itertools.product([NAN, INF], QUERIES):
        q, k, v = (t.to(device) for t in _poisoned(where, value, N // 2, N=N, dtype=dtype))
        _check_against_reference("triton", q, k, v, query)


# ----------------------------------------------------------------------------- selection of non-finite scores


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_non_finite_scores_rank_as_documented(backend, device):
    """NaN ranks as -inf (below every finite score), ties to the lower index; no error on any path."""
    dev = device if backend == "triton" else torch.device("cpu")
    scores = torch.tensor([[0.5, NAN, INF, -INF, 0.1, NAN, -1.0]], device=dev)
    x = torch.arange(8.0, device=dev).view(1, 8, 1)
    with pruneattn.use_backend(backend):
        _, idx = pruneattn.select_tokens(x, scores, k=5)
    assert idx.tolist() == [[0, 1, 2, 4, 6]]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_non_finite_fuse_weights_make_the_fused_token_nan(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    x = torch.randn(3, 9, 4, device=dev)
    scores = torch.arange(8.0, device=dev).flip(0).expand(3, 8).contiguous()  # keeps patches 0, 1, 2
    w = torch.rand(3, 8, device=dev)
    w[0, 5], w[1, 6], w[2, 1] = NAN, INF, NAN  # dropped, dropped, kept
    x[2, 1 + 2] = NAN  # a kept patch
    with pruneattn.use_backend(backend):
        kept, idx = pruneattn.select_tokens(x, scores, k=3, mode="fuse", fuse_weights=w)
    assert idx.tolist() == [[0, 1, 2]] * 3
    assert torch.isnan(kept[0, -1]).all() and torch.isnan(kept[1, -1]).all()
    assert torch.isfinite(kept[2, -1]).all()  # kept patches (their weights, their values) never enter it
    assert torch.isnan(kept[2, 3]).all() and torch.isfinite(kept[:2, :-1]).all()

    x[0, 1 + 4] = NAN  # a dropped patch: the fused token shows it, whatever its weight
    w = torch.rand(3, 8, device=dev)
    w[0, 4] = 0.0
    with pruneattn.use_backend(backend):
        kept, _ = pruneattn.select_tokens(x, scores, k=3, mode="fuse", fuse_weights=w)
    assert torch.isnan(kept[0, -1]).all() and torch.isfinite(kept[1, -1]).all()


# ----------------------------------------------------------------------------- rule 2: old fused token vs NaN


def _fused_in_config(mode: str = "fuse") -> BlockConfig:
    """The second of two fuse-mode pruning blocks: its input ends with the first one's fused token."""
    return BlockConfig(2, 0.5, "var", "cls", mode, 1, fused_in=True, plan=Plan((1, 2)), shape=None, reader=None)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_old_fused_token_loses_to_nan_patches(backend, device):
    cfg = _fused_in_config()
    assert cfg.fused_in
    dev = device if backend == "triton" else torch.device("cpu")
    B, P = 2, 6
    x = torch.randn(B, 1 + P + 1, 8, device=dev)
    scores = torch.full((B, P + 1), NAN, device=dev)  # the old fused token's score is overwritten
    scores[1, :3] = -INF
    st = AttentionStats(None, scores, torch.rand(B, P + 1, device=dev))
    with pruneattn.use_backend(backend):
        kept, state = scoped(cfg.plan, lambda state: (prune_tokens(cfg, x, st), state))
    idx = state.kept[2]
    assert idx.max() < P and idx.tolist() == [[0, 1, 2]] * 2
    assert kept.shape == (B, 1 + 3 + 1, 8)


def test_nan_image_in_fuse_mode_gives_valid_kept_indices():
    model = pruneattn.patch(tiny(), keep_rate=0.5, layers=(1, 2), mode="fuse")
    x = images()
    x[1] = NAN
    with pruneattn.use_backend("cpu"), torch.no_grad():
        out = model(x)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    kept = pruneattn.kept_indices(model)
    assert kept[1].shape == (2, 8) and kept[2].shape == (2, 4)
    assert all(int(t.max()) < 16 for t in kept.values())


# ----------------------------------------------------------------------------- rule 3: a forward that raised


class _Boom(Exception):
    pass


def test_kept_indices_refuse_after_a_forward_that_raised(monkeypatch):
    model = pruneattn.patch(tiny(), keep_rate=0.5, layers=(1, 2))
    with pruneattn.use_backend("cpu"), torch.no_grad():
        model(images(2))
        assert pruneattn.kept_indices(model)[2].shape == (2, 4)

        def boom(x):
            raise _Boom

        monkeypatch.setattr(model.blocks[1].mlp, "forward", boom)
        with pytest.raises(_Boom):
            model(images(3, seed=5))  # block 1 prunes this batch of 3, then raises before block 2
        with pytest.raises(RuntimeError, match="did not finish"):
            pruneattn.kept_indices(model)
        monkeypatch.undo()
        model(images(3, seed=5))
    assert {i: t.shape for i, t in pruneattn.kept_indices(model).items()} == {1: (3, 8), 2: (3, 4)}


def test_compiled_model_does_not_recompile_per_call():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = pruneattn.patch(tiny(), keep_rate=0.5, layers=(1, 2), mode="fuse")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    try:
        with pruneattn.use_backend("cpu"), torch.no_grad():
            for seed in range(4):
                compiled(images(2, seed=seed))
                assert pruneattn.kept_indices(model)[2].shape == (2, 4)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------- rule 4: fuse weights and float64


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_fuse_weights_whose_sum_overflows(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    x = torch.randn(2, 11, 5, device=dev)
    scores = torch.arange(10.0, device=dev).expand(2, 10).contiguous()  # keeps patches 7, 8, 9
    w = torch.full((2, 10), 3e38, device=dev)
    w[1, ::2] = 1e38
    with pruneattn.use_backend(backend):
        kept, _ = pruneattn.select_tokens(x, scores, k=3, mode="fuse", fuse_weights=w)
    w64 = w.double().cpu()[:, :7]
    truth = (w64.unsqueeze(-1) * x.double().cpu()[:, 1:8]).sum(1) / w64.sum(1, keepdim=True)
    assert rel_err(kept[:, -1], truth) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_tiny_fuse_weights_beside_huge_kept_ones(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    x = torch.randn(1, 7, 3, device=dev)
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1]], device=dev)  # keeps 0, 1
    w = torch.tensor([[3e38, 3e38, 1e-42, 2e-42, 1e-42, 4e-42]], device=dev)
    with pruneattn.use_backend(backend):
        kept, _ = pruneattn.select_tokens(x, scores, k=2, mode="fuse", fuse_weights=w)
    w64 = torch.tensor([1.0, 2, 1, 4], dtype=torch.float64)
    truth = (w64[:, None] * x.double().cpu()[0, 3:]).sum(0) / w64.sum()
    assert rel_err(kept[0, -1], truth) < 1e-3  # the float32 subnormal weights carry ~3 digits


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float64_selection_is_exact(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 40, 6, generator=g, dtype=torch.float64) * 1e3).to(dev)
    scores = torch.rand(2, 39, generator=g, dtype=torch.float64).to(dev)
    w = torch.rand(2, 39, generator=g, dtype=torch.float64).to(dev)
    with pruneattn.use_backend(backend):
        kept, idx = pruneattn.select_tokens(x, scores, k=11, mode="fuse", fuse_weights=w)
    ref_kept, ref_idx = R.select_tokens(x.cpu(), scores.cpu(), k=11, mode="fuse", fuse_weights=w.cpu())
    assert kept.dtype == torch.float64 and torch.equal(idx.cpu(), ref_idx)
    assert rel_err(kept, ref_kept) < 1e-13


# ----------------------------------------------------------------------------- rule 5: reference in half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("stat", STATS)
@pytest.mark.parametrize("query", QUERIES)
def test_reference_half_precision_scores_in_float32(dtype, stat, query):
    q, k, v = qkv(2, 6, 30, 16, dtype)
    out, scores, head_mean = R.attention_stats(q, k, v, stat=stat, query=query)
    qd, kd, vd = (t.double() for t in (q, k, v))
    a = R.received_attention(R.attention_probs(qd, kd), query)[:, :, 1:]
    assert out.dtype == dtype and scores.dtype == head_mean.dtype == torch.float32
    assert rel_err(scores, R.head_statistic(a, stat)) < 1e-5
    assert rel_err(head_mean, a.mean(1)) < 1e-6
    assert rel_err(out, R.attention_probs(qd, kd) @ vd) < 1e-2


# ----------------------------------------------------------------------------- rule 6: bad arguments


@pytest.mark.parametrize(
    "num_heads, error, match",
    [
        (0, ValueError, "num_heads"),
        (-2, ValueError, "num_heads"),
        (2.0, TypeError, "num_heads"),
        (True, TypeError, "num_heads"),
        (5, ValueError, "divisible"),
        (None, TypeError, "num_heads"),
    ],
)
def test_split_qkv_bad_num_heads(num_heads, error, match):
    with pytest.raises(error, match=match):
        pruneattn.split_qkv(torch.randn(2, 7, 3 * 2 * 8), num_heads)


@pytest.mark.parametrize(
    "qkv_arg, error, match",
    [
        ([[1.0] * 12], TypeError, "torch.Tensor"),
        (torch.randn(7, 48), ValueError, "3 dimensions"),
        (torch.randn(2, 7, 47), ValueError, "divisible"),
        (torch.randn(2, 7, 48).long(), TypeError, "float"),
    ],
)
def test_split_qkv_bad_tensor(qkv_arg, error, match):
    with pytest.raises(error, match=match):
        pruneattn.split_qkv(qkv_arg, 2)


def test_split_qkv_views():
    t = torch.randn(2, 7, 3 * 2 * 8)
    q, k, v = pruneattn.split_qkv(t, 2)
    assert q.shape == (2, 2, 7, 8) and q.data_ptr() == t.data_ptr()
    assert torch.equal(v[1, 1, 3], t[1, 3, 40:48])


@pytest.mark.parametrize("fn", [pruneattn.unpatch, pruneattn.kept_indices])
@pytest.mark.parametrize("bad", [None, "model", torch.randn(2)])
def test_unpatch_and_kept_indices_take_a_module(fn, bad):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fn(bad)


# ----------------------------------------------------------------------------- rule 7: trace, double backward, overlap


def test_jit_trace_of_patched_deit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    pruneattn.patch(model, keep_rate=0.7, mode="fuse")
    x, x2 = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)
    with pruneattn.use_backend("cpu"), torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        for inp in (x, x2):
            torch.testing.assert_close(traced(inp), model(inp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_double_backward_of_attention(backend, device):
    dev = device if backend == "triton" else torch.device("cpu")
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(1, 2, 9, 16, generator=g, dtype=dtype).to(dev).requires_grad_() for _ in range(3)]
    w, u = torch.randn(1, 2, 9, 16, generator=g, dtype=dtype).to(dev), torch.randn(3, generator=g, dtype=dtype)

    def second_order(attention):
        out = attention(*leaves)
        grads = torch.autograd.grad((out * w).sum(), leaves, create_graph=True)
        penalty = sum(c * gr.square().sum() for c, gr in zip(u.tolist(), grads))
        return torch.autograd.grad(penalty, leaves)

    def math(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 16**-0.5, dim=-1) @ v

    with pruneattn.use_backend(backend):
        got = second_order(lambda q, k, v: pruneattn.attention_scores(q, k, v)[0])
    want = second_order(math)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(got, want):
        assert rel_err(a, b) < tol


def test_double_backward_of_selection():
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    scores, w = torch.rand(2, 8), torch.rand(2, 8)
    kept, _ = pruneattn.select_tokens(x, scores, k=3, mode="fuse", fuse_weights=w)
    (gx,) = torch.autograd.grad(kept.square().sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    ref_kept, _ = R.select_tokens(x, scores, k=3, mode="fuse", fuse_weights=w)
    (rgx,) = torch.autograd.grad(ref_kept.square().sum(), x, create_graph=True)
    (rggx,) = torch.autograd.grad(rgx.sum(), x)
    assert rel_err(ggx, rggx) < 1e-12


@pytest.mark.parametrize("padding", [16, 17, 40])
def test_overlap_refuses_padding_that_makes_empty_patches(padding):
    model = tiny(img_size=64, patch_size=16)
    with pytest.raises(ValueError, match="padding"):
        pruneattn.overlap_patches(model, stride=12, padding=padding)


def test_overlap_largest_allowed_padding():
    model = pruneattn.overlap_patches(tiny(img_size=64, patch_size=16), stride=12, padding=15)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)

