"""GPU-only checks: bf16, large shapes, no host synchronization, CUDA graph capture."""
import pytest
import torch

import pruneattn
from pruneattn import reference as R
from pruneattn.validate import QUERIES, STATS
from helpers import poisoned_allocations, random_qkv, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(64, 6, 197, 64), (4, 16, 1025, 64), (8, 12, 577, 128), (1, 1, 1000, 32)], ids=str)
@pytest.mark.parametrize("query", QUERIES)
def test_kernels_on_gpu(shape, dtype, query):
    q, k, v = random_qkv(*shape, dtype, CUDA, seed=1)
    qd, kd, vd = (t.double() for t in (q, k, v))
    a = R.received_attention(R.attention_probs(qd, kd), query)[:, :, 1:]
    ref_out = R.attention_probs(qd, kd) @ vd
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for stat in STATS:
        with poisoned_allocations():
            res = pruneattn.attention_stats(q, k, v, stat=stat, query=query)
        assert rel_err(res.out, ref_out) < tol
        assert rel_err(res.scores, R.head_statistic(a, stat), atol=1e-3 * float(a.norm())) < tol


def test_pruning_step_has_no_host_sync_and_captures_in_a_cuda_graph():
    q, k, v = random_qkv(8, 6, 197, 64, torch.bfloat16, CUDA)
    x = torch.randn(8, 197, 384, device=CUDA, dtype=torch.bfloat16)

    def step():
        res = pruneattn.attention_stats(q, k, v, stat="mad")
        return pruneattn.select_tokens(x, res.scores, keep_rate=0.7, mode="fuse", fuse_weights=res.head_mean)

    eager_kept, eager_idx = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up (autotuning) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kept, idx = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(idx, eager_idx) and torch.equal(kept, eager_kept)
    # No value is read back on GPU tensors (value checks run on CPU tensors only): the whole step
    # runs under "error" sync debugging once autotuning is done.
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_backward_bf16_on_gpu():
    q, k, v = (t.detach().requires_grad_() for t in random_qkv(16, 6, 197, 64, torch.bfloat16, CUDA, packed=False))
    out, _ = pruneattn.attention_scores(q, k, v)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(R.attention_probs(*ref_in[:2]) @ ref_in[2], ref_in, g.double())
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got, ref) < 2e-2
