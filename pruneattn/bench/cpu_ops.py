"""CPU op-level benchmark: the fast CPU path (:mod:`pruneattn.cpu`) against SDPA alone and the eager path.

Timing: interleaved rounds, each candidate run once untimed right before its timed call
(``settle``, see :func:`pruneattn.bench.timing.time_cpu`), medians. Targets (CPU, fp32,
same run, interleaved repeats, medians): attention + scores with
``query="cls"`` within 1.15x of SDPA alone at (16, 6, 197, 64) and (8, 12, 577, 64) and at least 2x
faster than the eager path at N = 577; ``query="mean"`` within 2.5x of SDPA alone, its largest
temporary at most one query chunk (counted by recording every torch op, not timed).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import pruneattn
from pruneattn import cpu
from pruneattn._progress import progress_bar
from pruneattn.backend import use_backend
from pruneattn.bench.meta import environment, load_average
from pruneattn.bench.ops_suite import _eager_scores, _qkv
from pruneattn.bench.timing import time_cpu

SHAPES = ((16, 6, 197, 64), (8, 12, 577, 64))
SMOKE_SHAPES = ((2, 3, 150, 64),)
TARGETS = {"cls_over_sdpa": 1.15, "eager_over_cls_at_577": 2.0, "mean_over_sdpa": 2.5}


def candidates(q, k, v) -> dict:
    scale = q.shape[-1] ** -0.5
    return {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
        "cls var (op)": lambda: pruneattn.attention_scores(q, k, v, stat="var"),
        "cls mad (op)": lambda: pruneattn.attention_scores(q, k, v, stat="mad"),
        "cls var (cpu path, no op layer)": lambda: cpu.attention_stats(
            q, k, v, stat="var", query="cls", num_prefix=1, scale=scale
        ),
        "mean var (op)": lambda: pruneattn.attention_scores(q, k, v, stat="var", query="mean"),
        "eager cls var": lambda: _eager_scores(q, k, v),
    }


def largest_temporary(q, k, v, query: str) -> dict:
    """Largest tensor any torch op makes on the CPU path (outputs included), by recording every op."""
    from pruneattn.bench.recorder import OpRecorder

    with use_backend("cpu"), OpRecorder() as rec:
        pruneattn.attention_scores(q, k, v, query=query)
    B, H, N, d = q.shape
    c = min(N, max(cpu.QUERY_CHUNK, d + 1))
    big = rec.largest()
    return {
        "largest_op": big[0], "largest_shape": list(big[1]), "largest_numel": math.prod(big[1]),
        "one_query_chunk_numel": B * H * c * N, "output_numel": B * H * N * d, "nxn_outputs": len(rec.square_outputs(N)),
    }


def op_overhead(reps: int = 200) -> dict:
    """Cost of the op layer (validation, custom-op dispatch, autograd wrapper) on a tiny input."""
    _, (q, k, v) = _qkv(1, 1, 8, 64, torch.float32, "cpu")
    scale = 0.125
    t = time_cpu({
        "op": lambda: pruneattn.attention_scores(q, k, v),
        "custom op only": lambda: torch.ops.pruneattn.attention_stats(q, k, v, "var", "cls", 1, scale),
        "cpu path": lambda: cpu.attention_stats(q, k, v, stat="var", query="cls", num_prefix=1, scale=scale),
    }, reps=reps, warmup=10)
    return {name: r["median_s"] * 1e6 for name, r in t.items()}


def run_cpu_ops(shapes=SHAPES, *, reps: int = 15, smoke: bool = False, threads: int | None = 2, progress: bool = True) -> dict:
    if threads:
        torch.set_num_threads(threads)
    env = environment("cpu")
    rows, checks = [], []
    it = progress_bar(shapes, enabled=progress, desc="cpu ops", unit="shape")
    with use_backend("cpu"):
        for shape in it:
            _, (q, k, v) = _qkv(*shape, torch.float32, "cpu")
            t = time_cpu(candidates(q, k, v), reps=1 if smoke else reps, warmup=0 if smoke else 2, settle=not smoke)
            base = t["sdpa"]["median_s"]
            for name, r in t.items():
                rows.append({
                    "suite": "cpu attention+scores", "candidate": name, "dtype": "float32",
                    "B": shape[0], "H": shape[1], "N": shape[2], "d": shape[3],
                    "median_ms": r["median_s"] * 1e3, "q1_ms": r["q1_s"] * 1e3, "q3_ms": r["q3_s"] * 1e3,
                    "reps": r["reps"], "x_sdpa": r["median_s"] / base,
                    "device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
                    "threads": torch.get_num_threads(),
                })
            cls = t["cls var (op)"]["median_s"]
            mean = t["mean var (op)"]["median_s"]
            eager = t["eager cls var"]["median_s"]
            temp = largest_temporary(q, k, v, "mean")
            check = {
                "shape": list(shape),
                "cls_over_sdpa": cls / base, "cls_ok": cls / base <= TARGETS["cls_over_sdpa"],
                "mean_over_sdpa": mean / base, "mean_ok": mean / base <= TARGETS["mean_over_sdpa"],
                "eager_over_cls": eager / cls,
                "mean_largest_temporary": temp,
                "mean_temporary_ok": temp["largest_numel"] <= max(temp["one_query_chunk_numel"], temp["output_numel"]),
            }
            if shape[2] == 577:
                check["eager_ok"] = eager / cls >= TARGETS["eager_over_cls_at_577"]
            checks.append(check)
    overhead = op_overhead(20 if smoke else 200)
    return {"environment": env, "rows": rows, "checks": checks, "op_overhead_us": overhead, "load_average_end": load_average()}
