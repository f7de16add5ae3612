"""N x N detection on the op path: the shape of every tensor the torch ops make, on each backend."""
from __future__ import annotations

import math

import torch

from pruneattn.bench.recorder import OpRecorder
from pruneattn.validate import QUERIES
from tools.gpu_build.account import KEEP_RATE
from tools.gpu_build.hooks import check_interpreter_ok

__all__ = ["nxn_check"]


def nxn_check(B: int = 2, H: int = 3, N: int = 300, d: int = 64) -> dict:
    """Run the op path (attention + scores + selection) under :class:`OpRecorder` on the CPU path, the
    Triton path (interpreted) and the eager reference; report the N x N-sized outputs of each."""
    import pruneattn
    from pruneattn.backend import use_backend

    if N <= max(B * H, d, 64):
        raise ValueError("nxn_check needs N larger than B * H, d and the query chunk (else any dim >= N)")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3, H, d, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = torch.randn(B, N, H * d, generator=g)
    report = {}
    for backend in ("cpu", "triton", "reference"):
        for query in QUERIES:
            if backend == "triton" and not check_interpreter_ok():
                continue
            with use_backend(backend), OpRecorder() as rec:
                res = pruneattn.attention_stats(q, k, v, stat="var", query=query)
                pruneattn.select_tokens(x, res.scores, keep_rate=KEEP_RATE, mode="fuse", fuse_weights=res.head_mean)
            big = rec.largest()
            report[f"{backend}/{query}"] = {
                "ops": len(rec.records),
                "nxn_outputs": [f"{op} {list(s)}" for op, s in rec.square_outputs(N)],
                "largest_output": f"{big[0]} {list(big[1])}" if big else None,
                "largest_numel": math.prod(big[1]) if big else 0,
            }
    return {"shape": [B, H, N, d], "paths": report}
