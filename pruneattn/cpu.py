"""Fast PyTorch path, used on CPU tensors (and any device without the Triton kernels).

No N x N tensor over all queries is built: the output comes from SDPA's fused kernel; for
``query="cls"`` the scores need only the class token's row per head, (B, H, 1, N); for
``query="mean"`` the softmax is recomputed in query chunks and summed over queries, so the largest
temporary is (B, H, chunk, N).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pruneattn.reference import head_statistic

QUERY_CHUNK = 64


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, query: str) -> torch.Tensor:
    """Per-head attention received by each key, (B, H, N), in float32 (float64 for float64 input)."""
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    kt = k.transpose(-2, -1).to(acc_dtype)
    if query == "cls":
        return torch.softmax((q[:, :, :1].to(acc_dtype) @ kt) * scale, dim=-1)[:, :, 0]
    N = q.shape[2]
    total = torch.zeros(q.shape[0], q.shape[1], N, dtype=acc_dtype, device=q.device)
    for start in range(0, N, QUERY_CHUNK):
        chunk = q[:, :, start : start + QUERY_CHUNK].to(acc_dtype)
        total += torch.softmax((chunk @ kt) * scale, dim=-1).sum(dim=2)
    return total / N


def attention_stats(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, stat: str, query: str, num_prefix: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, scores, head_mean) as in :func:`pruneattn.ops.attention_stats`."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    a = received_attention(q, k, scale, query)[:, :, num_prefix:]
    return out, head_statistic(a, stat), a.mean(dim=1)
