"""The H100 roof of attention + scores: its compulsory traffic and FLOPs, and the time they bound.

:func:`attention_floor` counts what attention + scores must move (Q, K, V read once; output and scores
written once) and compute; :func:`h100_bound` turns bytes and FLOPs into a lower-bound time from an
H100 SXM's public figures. The op suite reports each measured H100 time as a fraction of that bound.
"""
from __future__ import annotations

__all__ = ["H100", "attention_floor", "h100_bound"]

H100 = {
    "name": "H100 SXM (public spec figures)",
    "hbm_bytes_per_s": 3.35e12,
    "dense_bf16_flops_per_s": 989e12,
    "note": "model, not a measurement: max(bytes / bandwidth, FLOPs / peak)",
}


def attention_floor(B: int, H: int, N: int, d: int, es: int, num_prefix: int = 1) -> dict:
    """Compulsory traffic of attention + scores: Q, K, V read once; output and scores written once."""
    qkv = 3 * B * H * N * d * es
    out = B * H * N * d * es
    scores = B * (N - num_prefix) * 4
    return {"loads": qkv, "stores": out + scores, "flops": 4 * B * H * N * N * d}


def h100_bound(bytes_moved: int, flops: int) -> dict:
    """The time an H100 SXM needs at least for ``bytes_moved`` and ``flops``, and which of the two binds."""
    t_mem = bytes_moved / H100["hbm_bytes_per_s"]
    t_flop = flops / H100["dense_bf16_flops_per_s"]
    return {"seconds": max(t_mem, t_flop), "memory_s": t_mem, "compute_s": t_flop, "bound": "memory" if t_mem >= t_flop else "compute"}
