"""Property test: shapes, prefix counts and options drawn by hypothesis, kernels vs reference."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pruneattn
from pruneattn import reference as R
from helpers import random_qkv, rel_err


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.sampled_from([1, 2, 3, 5, 6, 12, 16]))
    N = draw(st.integers(2, 90))
    d = draw(st.sampled_from([32, 64]))
    query = draw(st.sampled_from(["cls", "mean"]))
    num_prefix = draw(st.integers(1 if query == "cls" else 0, min(4, N - 1)))
    stat = draw(st.sampled_from(["var", "mad", "mean"]))
    keep_rate = draw(st.floats(0.01, 1.0))
    mode = draw(st.sampled_from(["drop", "fuse"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**16))
    return B, H, N, d, query, num_prefix, stat, keep_rate, mode, dtype, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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
