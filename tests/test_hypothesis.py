"""Property tests: shapes, layouts, dtypes, magnitudes and non-finite values drawn by hypothesis; the
reference, the CPU path and the kernels held to each other and to docs/semantics.md (section 9).

Profiles: "ci" (default, bounded: well under a minute) and "long" (``HYPOTHESIS_PROFILE=long``).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pruneattn
from helpers import random_qkv, rel_err
from pruneattn import reference as R
from pruneattn.validate import MODES, QUERIES, STATS

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("ci", max_examples=12, **_COMMON)
settings.register_profile("long", max_examples=400, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NAN, INF = float("nan"), float("inf")
EPS32 = 2.0**-24


# ----------------------------------------------------------------------------- the original property


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.sampled_from([1, 2, 3, 5, 6, 12, 16]))
    N = draw(st.integers(2, 90))
    d = draw(st.sampled_from([32, 64]))
    query = draw(st.sampled_from(QUERIES))
    num_prefix = draw(st.integers(1 if query == "cls" else 0, min(4, N - 1)))
    stat = draw(st.sampled_from(STATS))
    keep_rate = draw(st.floats(0.01, 1.0))
    mode = draw(st.sampled_from(MODES))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    return B, H, N, d, query, num_prefix, stat, keep_rate, mode, dtype, seed


@given(problem=problems())
def test_kernels_match_reference(problem, device):
    B, H, N, d, query, num_prefix, stat, keep_rate, mode, dtype, seed = problem
    q, k, v = random_qkv(B, H, N, d, dtype, device, seed=seed)
    with pruneattn.use_backend("triton"):
        res = pruneattn.attention_stats(q, k, v, stat=stat, query=query, num_prefix=num_prefix)
        x = torch.randn(B, N, 16, device=device)
        kept, idx = pruneattn.select_tokens(
            x, res.scores, keep_rate=keep_rate, num_prefix=num_prefix, mode=mode,
            fuse_weights=res.head_mean if mode == "fuse" else None,
        )
    qd, kd, vd = (t.cpu().double() for t in (q, k, v))
    ref_out, _ = R.attention_scores(qd, kd, vd, stat=stat, query=query, num_prefix=num_prefix)
    a = R.received_attention(R.attention_probs(qd, kd), query)[:, :, num_prefix:]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(res.out, ref_out) < tol
    assert rel_err(res.scores, R.head_statistic(a, stat), atol=1e-3 * float(a.norm())) < tol
    # Selection is checked on the kernel's own scores, so that it is exact whatever the score error.
    ref_kept, ref_idx = R.select_tokens(
        x.cpu().double(), res.scores.cpu().double(), keep_rate=keep_rate, num_prefix=num_prefix, mode=mode,
        fuse_weights=res.head_mean.cpu().double() if mode == "fuse" else None,
    )
    assert torch.equal(idx.cpu(), ref_idx) and rel_err(kept, ref_kept) < 1e-6


# ----------------------------------------------------------------------------- hard attention inputs

LAYOUTS = ("contiguous", "packed", "transposed", "expanded")


def make_qkv(layout, B, H, N, d, dtype, magnitude, poison, seed, device):
    """q, k, v (B, H, N, d) in one of four memory layouts, scaled by ``magnitude``; ``poison`` writes
    (flat position, value) pairs into the shared buffer before the views are taken."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "packed": (B, N, 3, H, d),  # timm's qkv projection
        "transposed": (3, B, N, H, d),  # heads transposed in, (B, N, H, d) memory
        "expanded": (3, 1, H, N, d),  # one image repeated over the batch: stride 0
        "contiguous": (3, B, H, N, d),
    }
    base = (torch.randn(shapes[layout], generator=g, dtype=torch.float64) * magnitude).to(dtype)
    flat = base.view(-1)
    for pos, value in poison:
        flat[pos % flat.numel()] = value
    base = base.to(device)
    if layout == "packed":
        return base.permute(2, 0, 3, 1, 4).unbind(0)
    if layout == "transposed":
        return base.transpose(2, 3).unbind(0)
    if layout == "expanded":
        return base.expand(3, B, H, N, d).unbind(0)
    return base.unbind(0)


@st.composite
def hard_attention(draw, backend):
    B = draw(st.integers(1, 2))
    H = draw(st.sampled_from([1, 2, 3, 6]))
    N = draw(st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 40)))
    d = draw(st.sampled_from([16, 24, 32]) if backend == "triton" else st.sampled_from([1, 7, 16, 32]))
    queries = ["mean"] + (["cls"] if N >= 2 else [])
    query = draw(st.sampled_from(queries))
    num_prefix = draw(st.integers(1 if query == "cls" else 0, min(3, N - 1)))
    stat = draw(st.sampled_from(STATS))
    dtypes = [torch.float32, torch.float16]
    if backend == "cpu":
        dtypes += [torch.bfloat16, torch.float64]
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    magnitude = draw(st.sampled_from([1e-30, 1e-3, 1.0, 4.0, 30.0]))
    poison = draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from([NAN, INF, -INF])), max_size=3))
    seed = draw(st.integers(0, 2**16))
    return B, H, N, d, query, num_prefix, stat, dtype, layout, magnitude, poison, seed


def _close_where_finite(got, truth, mask, tol, atol):
    got, truth = got.cpu()[mask], truth[mask]
    return rel_err(got, truth, atol=atol) < tol


def _check_hard_attention(backend, problem, device):
    B, H, N, d, query, num_prefix, stat, dtype, layout, magnitude, poison, seed = problem
    q, k, v = make_qkv(layout, B, H, N, d, dtype, magnitude, poison, seed, device)
    kw = dict(stat=stat, query=query, num_prefix=num_prefix)
    with pruneattn.use_backend(backend):
        got = pruneattn.attention_stats(q, k, v, **kw)
    qc, kc, vc = (t.cpu() for t in (q, k, v))
    rule = pruneattn.AttentionStats(*R.attention_stats(qc, kc, vc, **kw))  # the documented float32 rule, for the non-finite places
    assert got.out.dtype == dtype and got.out.shape == q.shape
    for name, a, b in zip(("out", "scores", "head_mean"), got, rule):
        assert torch.equal(torch.isfinite(a.cpu()), torch.isfinite(b)), name
        assert torch.equal(torch.isnan(a.cpu()), torch.isnan(b)) or name == "out", name

    # Finite values against the float64 truth, with a tolerance that grows with the largest logit:
    # every path rounds the logits to float32, and softmax turns that into a relative error.
    qd, kd, vd = (t.double() for t in (qc, kc, vc))
    scale = d**-0.5
    attn = R.attention_probs(qd, kd, scale)
    # the largest logit among the finite entries (a poisoned entry must not hide a large finite logit)
    qa, ka = (t.abs().nan_to_num(0.0, posinf=0.0, neginf=0.0) for t in (qd, kd))
    logit = float((qa @ ka.transpose(-2, -1)).max()) * scale
    base = {torch.float32: 1e-5, torch.float64: 1e-10}.get(dtype, 2e-2)
    tol = base + 64 * EPS32 * logit
    truth_out = attn @ vd
    mask = torch.isfinite(rule.out)
    assert _close_where_finite(got.out, truth_out, mask, tol, 1e-300)
    a = R.received_attention(attn, query)[:, :, num_prefix:]
    mask = torch.isfinite(rule.scores)
    atol = 1e-2 * float(a[torch.isfinite(a)].norm()) if mask.any() else 1.0
    atol = max(atol, torch.finfo(torch.float32).tiny)  # scores are float32: smaller true values round to 0 there
    assert _close_where_finite(got.scores, R.head_statistic(a, stat), mask, max(tol, 1e-5), atol)
    assert _close_where_finite(got.head_mean, a.mean(1), torch.isfinite(rule.head_mean), max(tol, 1e-5), 1e-30)


@given(problem=hard_attention("cpu"))
def test_cpu_path_on_hard_inputs(problem):
    _check_hard_attention("cpu", problem, torch.device("cpu"))


@given(problem=hard_attention("triton"))
def test_kernels_on_hard_inputs(problem, device):
    _check_hard_attention("triton", problem, device)


# ----------------------------------------------------------------------------- hard selection inputs

SCORE_VALUES = [0.0, 0.5, 1.0, -1.0, 1e-30, 3e38, -INF, INF, NAN]
WEIGHT_VALUES = [0.0, 1e-42, 1e-3, 0.25, 1.0, 3e38, NAN, INF]


@st.composite
def hard_selection(draw, backend):
    B = draw(st.integers(1, 3))
    N = draw(st.one_of(st.sampled_from([1, 2, 3]), st.integers(1, 40)))
    num_prefix = draw(st.integers(0, min(3, N - 1)))
    P = N - num_prefix
    k = draw(st.one_of(st.just(P), st.integers(1, P)))
    C = draw(st.sampled_from([1, 3, 16]))
    dtypes = [torch.float16, torch.float32, torch.float64]
    if backend == "cpu":
        dtypes.append(torch.bfloat16)
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    scores = draw(st.lists(st.sampled_from(SCORE_VALUES), min_size=B * P, max_size=B * P))
    mode = draw(st.sampled_from(MODES))
    weights = draw(st.lists(st.sampled_from(WEIGHT_VALUES), min_size=B * P, max_size=B * P))
    x_nan = draw(st.lists(st.integers(0, 10**6), max_size=2))
    seed = draw(st.integers(0, 2**16))
    return B, N, num_prefix, k, C, dtype, layout, scores, mode, weights, x_nan, seed


def _make_x(layout, B, N, C, dtype, x_nan, seed, device):
    g = torch.Generator().manual_seed(seed)
    shape = {"transposed": (B, C, N), "expanded": (1, N, C), "contiguous": (B, N, C)}[layout]
    base = torch.randn(shape, generator=g).to(dtype)
    for pos in x_nan:
        base.view(-1)[pos % base.numel()] = NAN
    base = base.to(device)
    if layout == "transposed":
        return base.transpose(1, 2)
    if layout == "expanded":
        return base.expand(B, N, C)
    return base


def _check_hard_selection(backend, problem, device):
    B, N, num_prefix, k, C, dtype, layout, scores, mode, weights, x_nan, seed = problem
    P = N - num_prefix
    x = _make_x(layout, B, N, C, dtype, x_nan, seed, device)
    s = torch.tensor(scores, dtype=torch.float32).view(B, P)
    w = torch.tensor(weights, dtype=torch.float32).view(B, P) if mode == "fuse" else None
    with pruneattn.use_backend(backend):
        kept, idx = pruneattn.select_tokens(
            x, s.to(device), k=k, num_prefix=num_prefix, mode=mode, fuse_weights=None if w is None else w.to(device)
        )
    ref_kept, ref_idx = R.select_tokens(x.cpu(), s, k=k, num_prefix=num_prefix, mode=mode, fuse_weights=w)
    # The documented ranking, spelled out independently: NaN as -inf, ties to the lower index.
    key = torch.where(torch.isnan(s), -INF, s).tolist()
    for b in range(B):
        assert idx[b].tolist() == sorted(sorted(range(P), key=lambda j: (-key[b][j], j))[:k])
    assert torch.equal(idx.cpu(), ref_idx) and idx.dtype == torch.int64
    assert kept.shape == (B, num_prefix + k + (mode == "fuse"), C) and kept.dtype == dtype
    assert torch.equal(torch.isfinite(kept.cpu()), torch.isfinite(ref_kept))
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
    mask = torch.isfinite(ref_kept)
    assert rel_err(kept.cpu()[mask], ref_kept[mask], atol=1e-30) < tol


@given(problem=hard_selection("cpu"))
def test_cpu_selection_on_hard_inputs(problem):
    _check_hard_selection("cpu", problem, torch.device("cpu"))


@given(problem=hard_selection("triton"))
def test_kernel_selection_on_hard_inputs(problem, device):
    if device.type == "cpu" and problem[5] == torch.bfloat16:
        pytest.skip("the interpreter has no bfloat16")
    _check_hard_selection("triton", problem, device)


def test_profiles_are_registered():
    assert settings.get_profile("ci").max_examples <= 20 and settings.get_profile("long").max_examples >= 200
