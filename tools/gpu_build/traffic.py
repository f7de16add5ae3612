"""Traffic models and floors beside the kernel account: selection's floor, SDPA's and the eager path's traffic.

The floors count the compulsory traffic (every input read once, every output written once); the SDPA
and eager figures are models of those kernels, not measurements. Attention's floor and the H100 bound
are the op suite's (:mod:`pruneattn.bench.roofline`).
"""
from __future__ import annotations

__all__ = ["eager_model", "flash_model", "select_floor"]


def select_floor(B: int, N: int, C: int, es: int, k: int, num_prefix: int = 1, fuse: bool = False) -> dict:
    """Selection + gather: scores read, the kept rows read and written once, indices written once."""
    P = N - num_prefix
    rows = num_prefix + k
    loads = B * P * 4 + B * rows * C * es
    stores = B * k * 8 + B * (rows + int(fuse)) * C * es
    if fuse:
        loads += B * (P - k) * C * es + B * P * 4  # the dropped rows and their weights
    return {"loads": loads, "stores": stores, "flops": 0}


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def flash_model(B: int, H: int, N: int, d: int, es: int, block_m: int, block_n: int) -> dict:
    """SDPA's flash forward, modelled: per query block K and V are streamed once; writes out + lse."""
    q = k = v = out = B * H * N * d * es
    n_qblocks = -(-N // block_m)
    return {
        "loads": q + (k + v) * n_qblocks,
        "loads_unique": q + k + v,
        "stores": out + B * H * N * 4,
        "stores_unique": out + B * H * N * 4,
        "dot_flops": 4 * B * H * _pad(N, block_m) * _pad(N, block_n) * d,
        "flops_exact": 4 * B * H * N * N * d,
        "tiles": [block_m, block_n],
    }


def eager_model(B: int, H: int, N: int, d: int, es: int, query: str) -> dict:
    """The eager path (timm's non-fused Attention + a score on the weights), modelled op by op:
    q * scale; S = q @ k^T (N x N written); softmax (N x N read, N x N written); out = P @ V (N x N read);
    the score reads the class row of P (or all of P for query="mean")."""
    x = B * H * N * d * es
    nn_ = B * H * N * N * es
    loads = x + (x + x) + nn_ + (nn_ + x)
    stores = x + nn_ + nn_ + x
    loads += nn_ if query == "mean" else B * H * N * es
    return {"loads": loads, "stores": stores, "flops_exact": 4 * B * H * N * N * d, "nxn_bytes_written": 2 * nn_}
