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

Padding masks (``valid``, (B, N) bool): SDPA takes them as a broadcast (B, 1, 1, N) additive key mask;
padded keys and values are zeroed first, so that whatever they hold cannot reach an output through
``0 * NaN``; the class row and the column sums mask the padded keys the same way, and the column sums
take the real queries only.

Every computation is in float32 (float64 for float64 input); scores and head means are returned as
float32, like every other path.

Non-finite inputs follow the reference (docs/semantics.md, "Non-finite values"). SDPA's fused kernel
does not always: a row whose logits hold no finite maximum (NaN or infinity in q, or in k for very
short rows) can come out as zeros. Such rows report a log-sum-exp that is NaN, infinite or exactly
0, so :func:`suspect_heads` finds them from the (B, H, N) log-sum-exp that SDPA returns anyway
(no extra pass over q, k or v), and only those heads are recomputed as the reference does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pruneattn import reference
from pruneattn.reference import compute_dtype

QUERY_CHUNK = 128  # queries per chunk (at least d + 1, see column_mean)
# Numbers in the per-chunk buffer (gb * nh, c, N), 512 Ki float32: small enough that each thread's
# share stays in a core's L2 cache, large enough that the work units are few (every unit is one
# parallel region, which costs most on a shared, oversubscribed machine).
CHUNK_ELEMENTS = 1 << 19

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def key_bias(valid: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The (B, 1, 1, N) additive key mask of a padding mask: 0 at real keys, -inf at padded ones."""
    if valid is None:
        return None
    bias = torch.zeros((valid.shape[0], 1, 1, valid.shape[1]), dtype=dtype, device=valid.device)
    return bias.masked_fill_(~valid[:, None, None, :], float("-inf"))


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA output (B, H, N, d) and, where the fused CPU kernel provides it, each row's natural-log
    log-sum-exp (B, H, N); ``None`` in its place otherwise. Padded keys (``valid`` False) masked."""
    bias = key_bias(valid, q.dtype)
    if _FLASH_CPU is not None and q.device.type == "cpu":
        try:
            out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
            return out, lse
        except (RuntimeError, TypeError, NotImplementedError):  # e.g. a dtype the kernel refuses
            pass
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), None


def class_row(q: torch.Tensor, k: torch.Tensor, scale: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of query 0 over all keys, (B, H, N), in float32 (float64 for float64 input);
    padded keys (``valid`` False) get weight 0.

    One (B, 1, d) @ (B, d, N) bmm per head, or one (H, 1, d) @ (H, d, N) bmm per image when B < H:
    each head's (image's) slice of a strided view (timm's packed qkv) is a valid bmm operand, read in
    place. The alternatives are slower: ``q_0 @ k^T`` copies K (``matmul`` cannot fold the (B, H)
    dims of a packed view), ``linalg.vecdot(k, q_0)`` makes a K-sized temporary per call, and a
    block-diagonal (B, H * d, H) bmm is a skinny GEMM (benchmarks/NOTES.md, section 1).
    """
    acc = compute_dtype(q.dtype)
    B, H = q.shape[:2]
    if B < H:  # loop over the smaller of B and H (batch 1: one bmm over the heads)
        rows = [torch.bmm(q[b, :, :1].to(acc), k[b].transpose(-2, -1).to(acc)) for b in range(B)]
        logits = torch.stack(rows, dim=0)[:, :, 0]
    else:
        rows = [torch.bmm(q[:, h, :1].to(acc), k[:, h].transpose(-2, -1).to(acc)) for h in range(H)]
        logits = torch.cat(rows, dim=1)
    logits.mul_(scale)
    if valid is not None:
        logits.masked_fill_(~valid[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)  # (B, H, N)


def head_statistic(a: torch.Tensor, stat: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistic over heads, mean over heads) of ``a`` (B, H, P), as :func:`reference.head_statistic`.

    ``var`` is computed as mean((a - mean)^2) (the population variance, two passes), which reuses
    the mean and is much faster than ``Tensor.var`` over the head dim of this layout.
    """
    mean = a.mean(dim=1, keepdim=True)
    if stat == "var":
        score = (a - mean).square_().mean(dim=1)
    else:
        score = reference.head_statistic(a, stat)
    return score, mean.squeeze(1)


def column_mean(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, scale: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """``(1/N) * sum_i softmax_j(scale * q_i . k_j)`` as (B, H, N), from the rows' log-sum-exp ``lse``.

    Work unit: gb images x nh heads, processed c queries at a time, sized so that the (gb * nh, c, N)
    chunk buffer holds about ``CHUNK_ELEMENTS`` numbers. Per chunk, one GEMM on augmented operands gives
    ``scale * q_i . k_j - lse_i`` (the extra column of Q holds ``-lse_i``, the extra row of K^T holds
    ones), ``exp_`` turns it into probabilities in place, and a GEMV with a ones vector accumulates the
    column sums: three passes over a cache-resident buffer, nothing N x N. c >= d + 1, so the
    augmented copies of Q, (gb * nh, N, d + 1), and of K^T, (gb * nh, d + 1, N), are no larger than
    the chunk buffer: the largest temporary is at most one (B, H, c, N) query chunk.
    Without ``lse`` (None) each chunk's rows are softmaxed instead (every chunk holds whole rows).

    With a padding mask ``valid`` (B, N) (and k zeroed at its padded keys) the sums run over the real
    queries i and are divided by their number: a padded query's row gets logit -inf through its
    augmented column (its q part zeroed). The columns of padded keys are left as they come (the
    caller scores them NaN); without ``lse`` they are masked before each chunk's softmax.
    """
    B, H, N, d = q.shape
    acc = compute_dtype(q.dtype)
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
    qa = torch.empty((gb, nh, N, d + 1), dtype=acc, device=dev)  # no larger than buf: c >= d + 1
    buf = torch.empty((gb * nh, c, N), dtype=acc, device=dev)
    ones = torch.ones((gb * nh, 1, c), dtype=acc, device=dev)
    lse = None if lse is None else lse.to(acc)
    for b0 in range(0, B, gb):
        for h0 in range(0, H, nh):
            b1, h1 = min(B, b0 + gb), min(H, h0 + nh)
            m = (b1 - b0) * (h1 - h0)
            # gb == 1 or nh == H: these slices are contiguous, the views below copy nothing.
            ka_u, qa_u = ka[: b1 - b0, : h1 - h0], qa[: b1 - b0, : h1 - h0]
            ka_u[:, :, :d].copy_(k[b0:b1, h0:h1].transpose(-2, -1))
            q_u = q[b0:b1, h0:h1]
            if q_u.dtype == acc:
                torch.mul(q_u, scale, out=qa_u[..., :d])
            else:  # scale in float32: a half-precision product would round the logits
                qa_u[..., :d].copy_(q_u).mul_(scale)
            if lse is None:
                qa_u[..., d] = 0.0
            else:
                torch.neg(lse[b0:b1, h0:h1], out=qa_u[..., d])
            if valid is not None:  # padded queries: 0 . k - inf = -inf, whatever q held
                pad_rows = ~valid[b0:b1, None, :, None]
                qa_u[..., :d].masked_fill_(pad_rows, 0.0)
                qa_u[..., d:].masked_fill_(pad_rows, float("-inf"))
                pad_keys = ~valid[b0:b1, None, None, :].expand(-1, h1 - h0, -1, -1).reshape(m, 1, N)
                pad_queries = pad_rows.expand(-1, h1 - h0, -1, -1).reshape(m, N, 1)
            ka_flat, qa_flat = ka_u.view(m, d + 1, N), qa_u.view(m, N, d + 1)
            tot = total[b0:b1, h0:h1].view(m, 1, N)
            for s in range(0, N, c):
                n = min(c, N - s)
                e = buf[:m, :n]
                torch.bmm(qa_flat[:, s : s + n], ka_flat, out=e)
                if lse is None:
                    if valid is not None:
                        e.masked_fill_(pad_keys, float("-inf"))
                    e = torch.softmax(e, dim=-1)
                    if valid is not None:  # a padded row: all -inf, NaN after the softmax
                        e.masked_fill_(pad_queries[:, s : s + n], 0.0)
                else:
                    e.exp_()
                tot.baddbmm_(ones[:m, :, :n], e)
    if valid is None:
        return total.view(B, H, N).div_(N)
    real = valid.sum(dim=1).to(acc).view(B, 1, 1)
    return total.view(B, H, N).div_(real)


def suspect_heads(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """(M, 2) indices (b, h) of the heads whose SDPA result may differ from the reference's softmax.

    With SDPA's log-sum-exp: heads with a row whose log-sum-exp is NaN, infinite or exactly 0 (a
    finite row has 0 only by coincidence; recomputing it then costs time, not correctness). Without
    it: heads whose q or k holds a non-finite value. Padded rows (``valid`` False) are not looked at.
    """
    if lse is None:
        fin_q, fin_k = torch.isfinite(q).all(dim=-1), torch.isfinite(k).all(dim=-1)
        if valid is not None:
            fin_q, fin_k = fin_q | ~valid[:, None, :], fin_k | ~valid[:, None, :]
        bad = ~(fin_q.all(dim=-1) & fin_k.all(dim=-1))
    else:
        if valid is not None:
            lse = lse.masked_fill(~valid[:, None, :], 1.0)
        # x * (1 / x) is NaN exactly where x is 0, infinite or NaN (about 1 otherwise, inf for a
        # subnormal x): two element-wise ops and a row sum over (B, H, N), cheaper than a mask of
        # three comparisons and negligible beside the attention.
        bad = torch.isnan((lse * lse.reciprocal()).sum(dim=-1))
    return bad.nonzero()


def recompute_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, query: str,
    heads: torch.Tensor, out: torch.Tensor, received: torch.Tensor, valid: torch.Tensor | None = None,
) -> None:
    """Overwrite ``out`` (B, H, N, d) and ``received`` (B, H, N) at ``heads`` (M, 2) with the
    reference's plain softmax attention, a few heads at a time (each builds an N x N matrix)."""
    acc = compute_dtype(q.dtype)
    N = q.shape[2]
    step = max(1, CHUNK_ELEMENTS // (N * N))
    for s in range(0, heads.shape[0], step):
        b, h = heads[s : s + step].unbind(1)
        logits = (q[b, h].to(acc) @ k[b, h].to(acc).transpose(-2, -1)).mul_(scale)
        rows = None if valid is None else valid[b]
        if rows is not None:
            logits.masked_fill_(~rows[:, None, :], float("-inf"))
        attn = torch.softmax(logits, dim=-1)  # (m, N, N)
        out[b, h] = (attn @ v[b, h].to(acc)).to(out.dtype)
        if query == "cls":
            got = attn[:, 0]
        elif rows is None:
            got = attn.mean(dim=1)
        else:
            got = attn.masked_fill(~rows[:, :, None], 0.0).sum(dim=1) / rows.sum(dim=1, keepdim=True).to(acc)
        received[b, h] = got.to(received.dtype)


def received_from_qk(
    q: torch.Tensor, k: torch.Tensor, scale: float, query: str, lse: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head attention received by each key, (B, H, N), computed from q and k without the N x N
    weights, in float32 (float64 for float64 input). (:func:`reference.received_attention` reads it
    from the weights.)

    ``lse``: each row's natural-log log-sum-exp, if known (``query="mean"`` then skips the softmax).
    """
    if query == "cls":
        return class_row(q, k, scale, valid)
    if q.shape[2] == 1:  # one key: softmax gives exactly 1, exp(logit - SDPA's lse) only to an ulp
        lse = None
    return column_mean(q, k, lse, scale, valid)


def zero_padding(t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``t`` (B, H, N, d) with the padded tokens' rows zeroed (a copy)."""
    return t.masked_fill(~valid[:, None, :, None], 0.0)


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stat: str, query: str, num_prefix: int, scale: float,
    valid: torch.Tensor | None = None, unit: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, scores, head_mean) as in :func:`pruneattn.ops.attention_stats`."""
    if valid is not None:  # padded keys and values can hold anything (NaN): none of it may reach a result
        k, v = zero_padding(k, valid), zero_padding(v, valid)
    out, lse = sdpa_with_lse(q, k, v, scale, valid)
    heads = suspect_heads(q, k, lse, valid)  # (0, 2) on finite inputs
    # SDPA's half-precision kernel computes its logits differently: its log-sum-exp does not
    # normalize the float32 logits computed here to float32 accuracy; softmax each chunk instead.
    exact_lse = lse if q.dtype in (torch.float32, torch.float64) else None
    a = received_from_qk(q, k, scale, query, exact_lse, valid)
    if heads.shape[0]:  # non-finite inputs: those heads as the reference computes them
        recompute_heads(q, k, v, scale, query, heads, out, a, valid)
    score, mean = head_statistic(reference.unit_sum(a[:, :, num_prefix:], unit), stat)
    score, mean = score.float(), mean.float()
    if valid is not None:
        pad = ~reference.unit_valid(valid, num_prefix, unit)
        score, mean = score.masked_fill_(pad, float("nan")), mean.masked_fill_(pad, 0.0)
    return out, score, mean
