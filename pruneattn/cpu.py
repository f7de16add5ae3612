"""Fast PyTorch path, used on CPU tensors (and any device without the Triton kernels).

No N x N tensor is built:

- the output comes from SDPA's fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``,
  which also hands back each row's log-sum-exp; plain ``F.scaled_dot_product_attention`` where that
  private op is missing or refuses the input);
- ``query="cls"``: the class token's row alone, (B, H, N) logits, softmaxed apart (one query per head,
  about 1/N of the attention's work);
- ``query="mean"``: the column sums of the softmax recomputed from SDPA's per-row log-sum-exp, one
  query chunk at a time: ``exp(scale * q_i . k_j - lse_i)`` comes out of ONE GEMM on augmented operands
  ``[scale * q_i, -lse_i] . [k_j, 1]``, then an in-place ``exp_`` and an accumulating GEMV. The largest
  temporary is (g * H, c, N) with c <= ``QUERY_CHUNK`` queries and g <= B images, i.e. at most one
  (B, H, QUERY_CHUNK, N) query chunk, sized to stay in the L2 cache.

Every computation is in float32 (float64 for float64 input); scores and head means are returned as
float32, like every other path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pruneattn.reference import head_statistic

QUERY_CHUNK = 128  # queries per chunk (at least d + 1, see column_mean)
# Elements of the per-chunk temporary (g * H, c, N): 256 Ki floats = 1 MiB in float32, half the L2.
CHUNK_ELEMENTS = 1 << 18

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA output (B, H, N, d) and, where the fused CPU kernel provides it, each row's natural-log
    log-sum-exp (B, H, N); ``None`` in its place otherwise."""
    if _FLASH_CPU is not None and q.device.type == "cpu":
        try:
            out, lse = _FLASH_CPU(q, k, v, 0.0, False, scale=scale)
            return out, lse
        except (RuntimeError, TypeError, NotImplementedError):  # e.g. a dtype the kernel refuses
            pass
    return F.scaled_dot_product_attention(q, k, v, scale=scale), None


def class_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of query 0 over all keys, (B, H, N), in float32 (float64 for float64 input).

    One (1 x d) @ (d x N) product per (batch, head): batched over the larger of B and H with a loop
    over the other, so that strided views (timm's packed qkv) are read in place, without the copy
    that ``matmul`` makes to fold non-collapsible batch dims.
    """
    B, H, N, _ = q.shape
    acc = _acc_dtype(q)
    q0 = q[:, :, :1].to(acc)
    kt = k.transpose(-2, -1)
    logits = torch.empty((B, H, 1, N), dtype=acc, device=q.device)
    if B >= H:
        for h in range(H):
            torch.bmm(q0[:, h], kt[:, h].to(acc), out=logits[:, h])
    else:
        for b in range(B):
            torch.bmm(q0[b], kt[b].to(acc), out=logits[b])
    return torch.softmax(logits.mul_(scale), dim=-1)[:, :, 0]


def column_mean(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``(1/N) * sum_i softmax_j(scale * q_i . k_j)`` as (B, H, N), from the rows' log-sum-exp ``lse``.

    Work unit: gb images x nh heads x c queries, sized so that its (gb * nh, c, N) buffer stays in
    the L2 cache (``CHUNK_ELEMENTS``). Per unit, one GEMM on augmented operands gives
    ``scale * q_i . k_j - lse_i`` (the extra column of Q holds ``-lse_i``, the extra row of K^T holds
    ones), ``exp_`` turns it into probabilities in place, and a GEMV with a ones vector accumulates the
    column sums: three passes over a cache-resident buffer, nothing N x N. c >= d + 1, so the
    augmented copy of K^T, (gb * nh, d + 1, N), is no larger than the chunk buffer: the largest
    temporary is at most one (B, H, c, N) query chunk.
    Without ``lse`` (None) each chunk's rows are softmaxed instead (every chunk holds whole rows).
    """
    B, H, N, d = q.shape
    acc = _acc_dtype(q)
    c = min(N, max(QUERY_CHUNK, d + 1))
    per_head = c * N
    if H * per_head <= CHUNK_ELEMENTS:
        gb, nh = max(1, min(B, CHUNK_ELEMENTS // (H * per_head))), H
    else:
        gb, nh = 1, max(1, min(H, CHUNK_ELEMENTS // per_head))
    dev = q.device
    total = torch.zeros((B, H, 1, N), dtype=acc, device=dev)
    ka = torch.empty((gb, nh, d + 1, N), dtype=acc, device=dev)
    ka[:, :, d] = 1.0
    qa = torch.empty((gb, nh, c, d + 1), dtype=acc, device=dev)
    buf = torch.empty((gb * nh, c, N), dtype=acc, device=dev)
    ones = torch.ones((gb * nh, 1, c), dtype=acc, device=dev)
    lse = None if lse is None else lse.to(acc)
    for b0 in range(0, B, gb):
        for h0 in range(0, H, nh):
            b1, h1 = min(B, b0 + gb), min(H, h0 + nh)
            m = (b1 - b0) * (h1 - h0)
            ka_u = ka[: b1 - b0, : h1 - h0]
            ka_u[:, :, :d].copy_(k[b0:b1, h0:h1].transpose(-2, -1))
            # gb == 1 or nh == H: these slices are contiguous, the views below copy nothing.
            ka_flat = ka_u.view(m, d + 1, N)
            tot = total[b0:b1, h0:h1].view(m, 1, N)
            for s in range(0, N, c):
                n = min(c, N - s)
                qa_u = qa[: b1 - b0, : h1 - h0, :n]
                q_c = q[b0:b1, h0:h1, s : s + n]
                if q_c.dtype == acc:
                    torch.mul(q_c, scale, out=qa_u[..., :d])
                else:  # scale in float32: a half-precision product would round the logits
                    qa_u[..., :d].copy_(q_c).mul_(scale)
                e = buf[:m, :n]
                if lse is None:
                    qa_u[..., d] = 0.0
                    torch.bmm(qa_u.reshape(m, n, d + 1), ka_flat, out=e)
                    e = torch.softmax(e, dim=-1)
                else:
                    torch.neg(lse[b0:b1, h0:h1, s : s + n], out=qa_u[..., d])
                    torch.bmm(qa_u.reshape(m, n, d + 1), ka_flat, out=e)
                    e.exp_()
                tot.baddbmm_(ones[:m, :, :n], e)
    return total.view(B, H, N).div_(N)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, query: str, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head attention received by each key, (B, H, N), in float32 (float64 for float64 input).

    ``lse``: each row's natural-log log-sum-exp, if known (``query="mean"`` then skips the softmax).
    """
    if query == "cls":
        return class_row(q, k, scale)
    return column_mean(q, k, lse, scale)


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stat: str, query: str, num_prefix: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, scores, head_mean) as in :func:`pruneattn.ops.attention_stats`."""
    out, lse = sdpa_with_lse(q, k, v, scale)
    if q.dtype not in (torch.float32, torch.float64):
        # SDPA's half-precision kernel computes its logits differently: its log-sum-exp normalizes
        # the float32 logits here only to ~1e-4 (measured at N = 130); softmax each chunk instead.
        lse = None
    a = received_attention(q, k, scale, query, lse)[:, :, num_prefix:]
    return out, head_statistic(a, stat).float(), a.mean(dim=1).float()
