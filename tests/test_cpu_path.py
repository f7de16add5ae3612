"""The fast CPU path (pruneattn/cpu.py) against the eager reference, its memory bound, and a smoke run
of the CPU benchmarks. No timing is asserted anywhere here."""
from __future__ import annotations

import json
import math

import pytest
import torch

import pruneattn
from pruneattn import cpu
from pruneattn import reference as R
from pruneattn.bench.recorder import OpRecorder
from pruneattn.validate import QUERIES, STATS
from helpers import poisoned_allocations, random_qkv


def _truth(q, k, v, stat, query, num_prefix):
    qd, kd, vd = (t.double() for t in (q, k, v))
    probs = R.attention_probs(qd, kd)
    a = R.received_attention(probs, query)[:, :, num_prefix:]
    return probs @ vd, R.head_statistic(a, stat), a.mean(dim=1)


def _check(q, k, v, stat, query, num_prefix=1):
    with pruneattn.use_backend("cpu"), poisoned_allocations():
        res = pruneattn.attention_stats(q, k, v, stat=stat, query=query, num_prefix=num_prefix)
    out, scores, head_mean = _truth(q, k, v, stat, query, num_prefix)
    assert res.scores.dtype == res.head_mean.dtype == torch.float32
    assert res.out.dtype == q.dtype and res.out.shape == q.shape
    out_tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[q.dtype]
    torch.testing.assert_close(res.out.double(), out, atol=out_tol, rtol=out_tol)
    # Scores are computed in float32 from the (rounded) inputs: tight whatever the input dtype.
    torch.testing.assert_close(res.scores.double(), scores, atol=1e-5 * float(scores.abs().max()) + 1e-12, rtol=1e-4)
    torch.testing.assert_close(res.head_mean.double(), head_mean, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("query", QUERIES)
@pytest.mark.parametrize("shape", [(3, 6, 197, 64), (2, 4, 130, 32), (5, 2, 7, 16), (1, 3, 1, 64)])
def test_matches_reference(shape, dtype, query):
    if query == "cls" and shape[2] == 1:
        pytest.skip("query='cls' needs a patch token after the class token")
    q, k, v = random_qkv(*shape, dtype, torch.device("cpu"))
    for stat in STATS:
        _check(q, k, v, stat, query, num_prefix=0 if shape[2] == 1 else 1)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("num_prefix", [1, 2, 5])
def test_layouts_and_prefix(packed, num_prefix):
    q, k, v = random_qkv(2, 3, 70, 64, torch.float32, torch.device("cpu"), packed=packed, seed=num_prefix)
    for query in QUERIES:
        _check(q, k, v, "var", query, num_prefix)


@pytest.mark.parametrize("budget", [1, 5_000, 1 << 30])  # head groups of one, a few heads, many images at once
def test_column_mean_work_units(monkeypatch, budget):
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", budget)
    q, k, v = random_qkv(3, 5, 150, 64, torch.float32, torch.device("cpu"), seed=7)
    _check(q, k, v, "var", "mean")


@pytest.mark.parametrize("layout", ["packed", "contiguous", "heads-major"])
@pytest.mark.parametrize("B,H", [(4, 2), (2, 6)])
def test_class_row_layouts(B, H, layout):
    """class_row reads any layout: timm's packed views, contiguous, heads-major."""
    N, d = 33, 64
    g = torch.Generator().manual_seed(B * H)
    if layout == "packed":
        q, k, _ = torch.randn(B, N, 3, H, d, generator=g, dtype=torch.float64).permute(2, 0, 3, 1, 4).unbind(0)
    elif layout == "contiguous":
        q, k = torch.randn(2, B, H, N, d, generator=g, dtype=torch.float64).unbind(0)
    else:  # (H, B, N, d) in memory: neither fold applies
        q, k = torch.randn(2, H, B, N, d, generator=g, dtype=torch.float64).transpose(1, 2).unbind(0)
    a = cpu.class_row(q, k, d ** -0.5)
    torch.testing.assert_close(a, R.attention_probs(q, k)[:, :, 0], atol=1e-12, rtol=1e-10)


def test_without_sdpa_statistics(monkeypatch):
    """Where SDPA hands out no log-sum-exp (older torch, other devices) each chunk is softmaxed."""
    monkeypatch.setattr(cpu, "_FLASH_CPU", None)
    q, k, v = random_qkv(2, 3, 150, 64, torch.float32, torch.device("cpu"))
    assert cpu.sdpa_with_lse(q, k, v, 0.125)[1] is None
    for query in QUERIES:
        _check(q, k, v, "mad", query)


def test_gradient_flows_through_the_cpu_path():
    q, k, v = (t.detach().requires_grad_(True) for t in random_qkv(2, 3, 20, 32, torch.float64, torch.device("cpu")))
    with pruneattn.use_backend("cpu"):
        out, _ = pruneattn.attention_scores(q, k, v)
    out.sum().backward()
    ref = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    (R.attention_probs(ref[0], ref[1]) @ ref[2]).sum().backward()
    for t, r in zip((q, k, v), ref):
        torch.testing.assert_close(t.grad, r.grad)


@pytest.mark.parametrize("query", QUERIES)
def test_no_nxn_tensor_and_mean_temporary_is_one_chunk(query):
    B, H, N, d = 2, 3, 300, 64  # N larger than B * H, d and the chunk: any N x N slab is visible
    q, k, v = random_qkv(B, H, N, d, torch.float32, torch.device("cpu"))
    with pruneattn.use_backend("cpu"), OpRecorder() as rec:
        pruneattn.attention_scores(q, k, v, query=query)
    assert rec.records, "the recorder saw no op: it would miss an N x N tensor too"
    assert rec.square_outputs(N) == []
    chunk = B * H * max(cpu.QUERY_CHUNK, d + 1) * N
    largest = max(math.prod(s) for _, s in rec.records)
    assert largest <= max(chunk, B * H * N * d)
    if query == "mean":  # at most one chunk; in practice an L2-sized slice of it
        temps = [s for op, s in rec.records if "flash_attention" not in op]
        assert max(math.prod(s) for s in temps) <= chunk
    # The detector sees the eager path's matrix (so the assertions above can fail).
    with pruneattn.use_backend("reference"), OpRecorder() as rec:
        pruneattn.attention_scores(q, k, v, query=query)
    assert rec.square_outputs(N)


def test_cpu_op_benchmark_smoke(tmp_path):
    from pruneattn.bench import main

    assert main(["--cpu-ops", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cpu_ops.json").read_text())
    names = {r["candidate"] for r in res["rows"]}
    assert {"sdpa", "cls var (op)", "mean var (op)", "eager cls var"} <= names
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["dtype"] == "float32" and r["threads"] >= 1
        assert {"device", "torch", "triton", "date", "B", "H", "N", "d"} <= set(r)
    check = res["checks"][0]
    assert check["mean_largest_temporary"]["nxn_outputs"] == 0
    assert check["mean_temporary_ok"] is True
    assert (tmp_path / "cpu_ops.md").read_text().startswith("# CPU attention + scores")
    assert (tmp_path / "cpu_ops.png").stat().st_size > 1000


def test_cpu_model_benchmark_smoke():
    from pruneattn.bench import models as M
    from pruneattn.bench import models_cpu

    res = models_cpu.run_models_cpu((("deit_tiny_patch16_224", 64, (2,)),), smoke=True, memory=False, progress=False)
    rows = {r["config"]: r for r in res["rows"]}
    assert set(rows) == {c.name for c in models_cpu.CONFIGS}
    assert rows["unpatched"]["flop_bound"] == 1.0 and rows["unpatched"]["speedup"] == 1.0
    pr = rows[M.pruned("var", 0.7).name]
    assert pr["flop_bound"] > 1.0 and math.isclose(pr["bound_fraction"], pr["speedup"] / pr["flop_bound"])
    assert {c["config"] for c in res["checks"]} == {pr["config"]}
    mem = models_cpu.peak_memory("deit_tiny_patch16_224", 64, 2, M.pruned("var", 0.7), threads=1, runs=1)
    assert mem["peak_rss_mb"] > 0
    if mem["memory_method"].startswith("VmHWM"):
        assert 0 < mem["forward_peak_mb"] <= mem["peak_rss_mb"]
