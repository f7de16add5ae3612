"""Op-level suite: attention + scores, selection + gather, forward + backward, against their baselines.

On a GPU: bfloat16 and float16, N in {197, 325, 577, 785}, H in {3, 6, 12, 16}, d = 64, a batch that
fills the GPU (B * H * N ~ 256 * 6 * 197 rows), timed with ``triton.testing.do_bench``; both CUDA
backends of attention + scores (fused kernel, SDPA + class-row kernel) so that the per-shape choice
(:mod:`pruneattn.backend`) can be measured. ``smoke=True`` runs tiny shapes once (on the CPU
under ``TRITON_INTERPRET=1`` this exercises the whole suite's plumbing in seconds).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

import pruneattn
from pruneattn import reference
from pruneattn._progress import progress_bar
from pruneattn.backend import backend_for, use_attention_kernel, use_backend
from pruneattn.bench.meta import environment
from pruneattn.bench.timing import time_fns
from pruneattn.validate import STATS

NS = (197, 325, 577, 785)
HS = (3, 6, 12, 16)
HEAD_DIM = 64
ROWS_PER_BATCH = 256 * 6 * 197  # B * H * N of DeiT-S at batch 256: "a batch that fills the GPU"
KEEP = 0.7
SMOKE_SHAPES = ((2, 17),)  # (H, N)


def fill_batch(H: int, N: int) -> int:
    return max(1, round(ROWS_PER_BATCH / (H * N)))


def _qkv(B, H, N, d, dtype, device, requires_grad=False, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(device=device, dtype=dtype)
    qkv.requires_grad_(requires_grad)
    return qkv, qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's strided views


def _eager_scores(q, k, v, stat="var", query="cls"):
    """The eager path EViT-style code takes: the softmax matrix, then the statistic over heads."""
    attn = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
    out = attn @ v
    a = attn[:, :, 0, 1:] if query == "cls" else attn.mean(dim=2)[:, :, 1:]
    return out, reference.head_statistic(a.float(), stat)


def attention_candidates(q, k, v, kernel_backend: str) -> dict[str, Callable[[], object]]:
    """Attention + scores per stat (both CUDA backends where the Triton kernels run), SDPA, eager."""
    fns: dict[str, Callable[[], object]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
    if kernel_backend == "triton":
        for backend in ("fused", "sdpa"):
            for stat in STATS:
                def run(stat=stat, backend=backend):
                    with use_attention_kernel(backend):
                        return pruneattn.attention_scores(q, k, v, stat=stat)
                fns[f"{backend} cls {stat}"] = run

        def run_mean():
            return pruneattn.attention_scores(q, k, v, stat="var", query="mean")
        fns["fused mean-query var"] = run_mean
    else:
        for stat in STATS:
            fns[f"cpu cls {stat}"] = lambda stat=stat: pruneattn.attention_scores(q, k, v, stat=stat)
        fns["cpu mean-query var"] = lambda: pruneattn.attention_scores(q, k, v, query="mean")
    fns["eager cls var"] = lambda: _eager_scores(q, k, v)
    return fns


def selection_candidates(x: torch.Tensor, scores: torch.Tensor, weights: torch.Tensor) -> dict[str, Callable[[], object]]:
    P = scores.shape[1]
    k = pruneattn.num_kept(P, keep_rate=KEEP)
    C = x.shape[-1]

    def torch_topk():
        idx = torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values
        kept = torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(-1, -1, C))
        return torch.cat([x[:, :1], kept], dim=1), idx

    return {
        "pruneattn drop": lambda: pruneattn.select_tokens(x, scores, keep_rate=KEEP),
        "pruneattn fuse": lambda: pruneattn.select_tokens(x, scores, keep_rate=KEEP, mode="fuse", fuse_weights=weights),
        "torch topk+sort+gather": torch_topk,
        "torch stable sort+gather (reference)": lambda: reference.select_k(x, scores, k, 1, None),
    }


def backward_candidates(qkv, q, k, v, grad) -> dict[str, Callable[[], object]]:
    def run(fn):
        def step():
            fn().backward(grad)
            qkv.grad = None
        return step

    return {
        "pruneattn fwd+bwd": run(lambda: pruneattn.attention_scores(q, k, v)[0]),
        "sdpa fwd+bwd": run(lambda: F.scaled_dot_product_attention(q, k, v)),
        "eager fwd+bwd": run(lambda: _eager_scores(q, k, v)[0]),
    }


def _rows(env, suite, dtype, shape, timings, baseline):
    base = timings[baseline]["median_s"]
    rows = []
    for name, t in timings.items():
        rows.append({
            "suite": suite, "candidate": name, "dtype": str(dtype).replace("torch.", ""),
            "B": shape[0], "H": shape[1], "N": shape[2], "d": shape[3],
            "median_ms": t["median_s"] * 1e3, "q1_ms": t["q1_s"] * 1e3, "q3_ms": t["q3_s"] * 1e3, "reps": t["reps"],
            f"x_{baseline.split()[0]}": t["median_s"] / base,
            "device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
        })
    return rows


def run_ops(
    device: torch.device | str,
    *,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shapes: tuple[tuple[int, int], ...] | None = None,
    batch: int | None = None,
    smoke: bool = False,
    suites: tuple[str, ...] = ("attention", "selection", "backward"),
    progress: bool = True,
) -> dict:
    """Run the op-level suite; returns {"environment", "rows"} (one row per candidate and shape)."""
    device = torch.device(device)
    kernel_backend = backend_for(device)
    if dtypes is None:
        dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
        if device.type == "cpu" and kernel_backend == "triton":
            dtypes = (torch.float16,)  # the interpreter has no bfloat16
    if shapes is None:
        shapes = SMOKE_SHAPES if smoke else tuple((H, N) for N in NS for H in HS)
    env = environment(device)
    work = [(dt, H, N, s) for dt in dtypes for H, N in shapes for s in suites]
    it = progress_bar(work, enabled=progress, desc="op suite", unit="case")
    rows: list[dict] = []
    choices: list[dict] = []
    for dtype, H, N, suite in it:
        B = batch or (2 if smoke else fill_batch(H, N))
        shape = (B, H, N, HEAD_DIM)
        with use_backend(kernel_backend):
            if suite == "attention":
                _, (q, k, v) = _qkv(B, H, N, HEAD_DIM, dtype, device)
                fns = attention_candidates(q, k, v, kernel_backend)
                t = time_fns(fns, device, quick=smoke)
                rows += _rows(env, "attention+scores", dtype, shape, t, "sdpa")
                if kernel_backend == "triton" and device.type == "cuda":
                    best = min(("fused", "sdpa"), key=lambda b: t[f"{b} cls var"]["median_s"])
                    choices.append({"device": env["device"], "dtype": str(dtype).replace("torch.", ""),
                                    "H": H, "d": HEAD_DIM, "N": N, "backend": best})
            elif suite == "selection":
                g = torch.Generator().manual_seed(1)
                x = torch.randn(B, N, H * HEAD_DIM, generator=g).to(device=device, dtype=dtype)
                scores = torch.rand(B, N - 1, generator=g).to(device)
                weights = torch.rand(B, N - 1, generator=g).to(device)
                t = time_fns(selection_candidates(x, scores, weights), device, quick=smoke)
                rows += _rows(env, "selection+gather", dtype, shape, t, "torch topk+sort+gather")
            elif suite == "backward":
                qkv, (q, k, v) = _qkv(B, H, N, HEAD_DIM, dtype, device, requires_grad=True)
                grad = torch.randn(B, H, N, HEAD_DIM, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
                t = time_fns(backward_candidates(qkv, q, k, v, grad), device, quick=smoke)
                rows += _rows(env, "forward+backward", dtype, shape, t, "sdpa fwd+bwd")
            else:
                raise ValueError(f"unknown suite {suite!r}")
    add_roofline(rows)
    return {"environment": env, "rows": rows, "choices": choices}


def add_roofline(rows: list[dict]) -> None:
    """Fraction of the binding H100 roof (model) reached by each attention row measured on an H100."""
    from pruneattn.bench.roofline import attention_floor, h100_bound

    for r in rows:
        if r["suite"] != "attention+scores" or "H100" not in r["device"]:
            continue
        es = 2 if r["dtype"] in ("bfloat16", "float16") else 4
        fl = attention_floor(r["B"], r["H"], r["N"], r["d"], es)
        bound = h100_bound(fl["loads"] + fl["stores"], fl["flops"])
        r["roof_fraction"] = bound["seconds"] / (r["median_ms"] / 1e3)
        r["roof"] = bound["bound"]


def summary(rows: list[dict]) -> list[dict]:
    """Compact rows for the printed table: one line per (suite, dtype, shape, candidate)."""
    keys = ("suite", "dtype", "B", "H", "N", "candidate", "median_ms")
    out = []
    for r in rows:
        s = {k: r[k] for k in keys}
        for k, v in r.items():
            if k.startswith("x_"):
                s["ratio"] = v
        if "roof_fraction" in r:
            s["roof"] = r["roof_fraction"]
        out.append(s)
    return out


def plot(rows: list[dict], path: str) -> bool:
    """Attention + scores time relative to SDPA alone, per shape (one bar per candidate)."""
    from pruneattn.bench.report import bar_plot

    att = [r for r in rows if r["suite"].endswith("attention+scores")]
    if not att:
        return False
    dtype = att[0]["dtype"]
    att = [r for r in att if r["dtype"] == dtype]
    groups = sorted({(r["H"], r["N"]) for r in att}, key=lambda x: (x[1], x[0]))
    cands = list(dict.fromkeys(r["candidate"] for r in att))
    series = {c: [next((r["x_sdpa"] for r in att if r["candidate"] == c and (r["H"], r["N"]) == g), math.nan) for g in groups] for c in cands}
    return bar_plot(path, f"attention + scores / SDPA alone ({dtype}, {att[0]['device']})",
                    [f"H{h} N{n}" for h, n in groups], series, "time / SDPA")
