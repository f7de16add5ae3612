"""Every head dim from 16 to 256 through the Triton kernels (interpreter without a GPU).

Head dims that are no power of two (24, 40, 72, 80, 96) are padded to one inside the kernels only:
the tests hold every path to the float64 reference with poisoned outputs, and the kernel account
shows that no padded element is ever loaded or stored.
"""
import pytest
import torch

import pruneattn
from pruneattn import reference as R
from pruneattn.backend import use_attention_kernel
from helpers import poisoned_allocations, random_qkv, rel_err, tol

HEAD_DIMS = (16, 24, 40, 72, 80, 96, 256)


def _check(d: int, dtype: torch.dtype, query: str, device: torch.device, attention: str, stat: str) -> None:
    B, H, N = 2, 3, 37  # N over one 32-key block: a full block and a masked tail
    q, k, v = random_qkv(B, H, N, d, dtype, device, seed=d)
    qd, kd, vd = (t.detach().cpu().double() for t in (q, k, v))
    with pruneattn.use_backend("triton"), use_attention_kernel(attention), poisoned_allocations():
        res = pruneattn.attention_stats(q, k, v, stat=stat, query=query)
    ref_out, _ = R.attention_scores(qd, kd, vd, stat=stat, query=query)
    ref_a = R.received_attention(R.attention_probs(qd, kd), query)[:, :, 1:]
    assert res.out.shape == (B, H, N, d)
    assert torch.isfinite(res.out).all() and torch.isfinite(res.scores).all()
    assert rel_err(res.out, ref_out) < tol(dtype)
    assert rel_err(res.scores, R.head_statistic(ref_a, stat), atol=1e-3 * float(ref_a.norm())) < tol(dtype)
    assert rel_err(res.head_mean, ref_a.mean(1)) < tol(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_fused_kernels_take_every_head_dim(d, dtype, device):
    _check(d, dtype, "cls", device, "fused", "var")
    _check(d, dtype, "mean", device, "fused", "mad")  # the column pass


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_class_row_kernel_takes_every_head_dim(d, device):
    _check(d, torch.float32, "cls", device, "sdpa", "mad")


@pytest.mark.parametrize("d", [1, 8, 15, 257, 320])
def test_head_dims_outside_the_kernels_range_name_d(d, device):
    q, k, v = random_qkv(1, 2, 5, d, torch.float32, device)
    with pruneattn.use_backend("triton"), pytest.raises(ValueError, match=f"d = {d}"):
        pruneattn.attention_scores(q, k, v)
    with pruneattn.use_backend("cpu"):  # the CPU path takes any head dim
        out, _ = pruneattn.attention_scores(q.cpu(), k.cpu(), v.cpu())
    assert out.shape == q.shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="the account runs the kernels in the interpreter")
@pytest.mark.parametrize("d", [24, 72])
def test_padded_head_dim_moves_only_real_elements(d):
    from tools.gpu_build import account as A

    B, H, N, es = 1, 3, 40, 2  # float16
    padded, square = A.kernel_accounts(B, H, N, d=d), A.kernel_accounts(B, H, N, d=64)
    tensor_bytes = B * H * N * d * es
    for name in ("attention_fwd[cls]", "attention_fwd[mean]", "column_mean", "class_row"):
        acc, ref = padded[name].by_buffer, square[name].by_buffer
        for buf in ("q", "k", "v"):
            if buf in ref and ref[buf].loads_unique == B * H * N * 64 * es:
                assert acc[buf].loads_unique == tensor_bytes, (name, buf)
        for buf, traffic in ref.items():
            if buf in ("q", "k", "v", "out"):
                continue
            # Row statistics, class logits, received attention: independent of the head dim.
            assert (acc[buf].stores, acc[buf].stores_unique) == (traffic.stores, traffic.stores_unique), (name, buf)
        if "out" in ref:
            assert acc["out"].stores == acc["out"].stores_unique == tensor_bytes, name
    # Attention reads the whole of Q, K and V once per program at least: the unique loads are exact.
    fwd = padded["attention_fwd[cls]"].by_buffer
    assert sum(fwd[b].loads_unique for b in ("q", "k", "v")) == 3 * tensor_bytes
