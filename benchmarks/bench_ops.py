"""Op-level pytest-benchmark suite (GPU; tiny shapes under the interpreter with PRUNEATTN_BENCH_SMOKE=1).

    pytest benchmarks/bench_ops.py --benchmark-group-by=param:shape --benchmark-columns=median,iqr

Attention + scores (every candidate of :func:`pruneattn.bench.ops_suite.attention_candidates`: both
CUDA backends x var / mad / mean, query="mean", SDPA alone, the eager path), selection + gather vs
torch topk / sort / gather, forward + backward; bf16 and fp16 on a GPU, N in {197, 325, 577, 785},
H in {3, 6, 12, 16}, d = 64, a batch that fills the GPU. ``pruneattn bench --ops`` runs the same
candidates with ``triton.testing.do_bench`` and writes JSON / Markdown / PNG.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # before pruneattn's kernels are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pruneattn.bench.timing import sync  # noqa: E402
from pruneattn.bench import ops_suite as S  # noqa: E402
from pruneattn.backend import backend_for, use_backend  # noqa: E402

SMOKE = os.environ.get("PRUNEATTN_BENCH_SMOKE", "0") not in ("", "0")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND = backend_for(DEVICE)
DTYPES = [torch.bfloat16, torch.float16] if DEVICE.type == "cuda" else [torch.float16]
SHAPES = list(S.SMOKE_SHAPES) if SMOKE or DEVICE.type != "cuda" else [(H, N) for N in S.NS for H in S.HS]


def _batch(H, N):
    return 2 if SMOKE or DEVICE.type != "cuda" else S.fill_batch(H, N)


def _names(kind):
    q = torch.empty(1, 1, 1, 64)
    if kind == "attention":
        return list(S.attention_candidates(q, q, q, BACKEND))
    if kind == "selection":
        return list(S.selection_candidates(torch.empty(1, 2, 4), torch.empty(1, 1), torch.empty(1, 1)))
    return ["pruneattn fwd+bwd", "sdpa fwd+bwd", "eager fwd+bwd"]


def _bench(benchmark, fn):
    def run():
        fn()
        sync()
    with use_backend(BACKEND):
        run()  # warm-up (autotuning, compilation)
        benchmark(run)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-N{s[1]}")
@pytest.mark.parametrize("candidate", _names("attention"))
def test_attention_scores(benchmark, candidate, shape, dtype):
    H, N = shape
    _, (q, k, v) = S._qkv(_batch(H, N), H, N, S.HEAD_DIM, dtype, DEVICE)
    benchmark.group = f"attention+scores {dtype} H{H} N{N}"
    _bench(benchmark, S.attention_candidates(q, k, v, BACKEND)[candidate])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-N{s[1]}")
@pytest.mark.parametrize("candidate", _names("selection"))
def test_selection_gather(benchmark, candidate, shape, dtype):
    H, N = shape
    B = _batch(H, N)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, H * S.HEAD_DIM, generator=g).to(DEVICE, dtype)
    scores, weights = torch.rand(B, N - 1, generator=g).to(DEVICE), torch.rand(B, N - 1, generator=g).to(DEVICE)
    benchmark.group = f"selection+gather {dtype} H{H} N{N}"
    _bench(benchmark, S.selection_candidates(x, scores, weights)[candidate])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-N{s[1]}")
@pytest.mark.parametrize("candidate", _names("backward"))
def test_forward_backward(benchmark, candidate, shape, dtype):
    H, N = shape
    B = _batch(H, N)
    qkv, (q, k, v) = S._qkv(B, H, N, S.HEAD_DIM, dtype, DEVICE, requires_grad=True)
    grad = torch.randn(B, H, N, S.HEAD_DIM).to(DEVICE, dtype)
    benchmark.group = f"forward+backward {dtype} H{H} N{N}"
    _bench(benchmark, S.backward_candidates(qkv, q, k, v, grad)[candidate])
