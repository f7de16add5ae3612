"""Markdown reports: the kernel account and the GPU build."""
from __future__ import annotations

from pruneattn.bench.static.account import BOUND_BATCH, HEAD_DIM
from pruneattn.bench.static.traffic import H100

def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Kernel account (exact counts from Triton's interpreter; times are a model)",
        "",
        f"- date {env['date']}, torch {env['torch']}, triton {env['triton']}, interpreter on {env['device']}",
        f"- counts per image (batch {result['batch']} run; counts are linear in B), d = {HEAD_DIM}, "
        f"{result['dtype']} in the interpreter (bfloat16 moves the same bytes); tiles pinned to the first "
        f"autotune config {result['shapes'][0]['tiles_interpreted']} (BLOCK_M, BLOCK_N)",
        f"- H100 bound: **model, not a measurement**: max(bytes / {H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"FLOPs / {H100['dense_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s) at batch {BOUND_BATCH}, with the "
        "kernel's unique bytes (compulsory traffic) and its executed dot FLOPs; the floor's with exact FLOPs",
        "- loads / stores: all bytes the kernels move; unique: at distinct addresses (each byte once)",
        "",
        "| H | N | path | loads MB | unique loads MB | stores MB | unique stores MB | floor MB (ld+st) "
        "| dot GFLOP | / flash same tiles | extra f32 stored per (b,h,row) | H100 bound us (floor us) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sh in result["shapes"]:
        B, H, N = sh["B"], sh["H"], sh["N"]
        flash = sh["sdpa_flash_model"]
        for name, r in sh["pipelines"].items():
            fl = r["floor"]
            ratio = f"{r['dot_flops'] / flash['dot_flops']:.3f}" if r["dot_flops"] else "-"
            extra = f"{(r['stores'] - fl['stores']) / (B * H * N * 4):.2f}" if "select" not in name else "-"
            lines.append(
                f"| {H} | {N} | {name} | {_mb(r['loads'] / B)} | {_mb(r['loads_unique'] / B)} | {_mb(r['stores'] / B)} "
                f"| {_mb(r['stores_unique'] / B)} | {_mb((fl['loads'] + fl['stores']) / B)} | {r['dot_flops'] / B / 1e9:.4f} "
                f"| {ratio} | {extra} | {r['h100_bound_kernel']['seconds'] * 1e6:.1f} ({r['h100_bound_floor']['seconds'] * 1e6:.1f}) |"
            )
        lines.append(
            f"| {H} | {N} | SDPA flash (model) | {_mb(flash['loads'] / B)} | {_mb(flash['loads_unique'] / B)} "
            f"| {_mb(flash['stores'] / B)} | {_mb(flash['stores_unique'] / B)} | - | {flash['dot_flops'] / B / 1e9:.4f} "
            f"| 1.000 | 1.00 (lse) | {flash['h100_bound']['seconds'] * 1e6:.1f} |"
        )
        for q, e in sh["eager_model"].items():
            lines.append(
                f"| {H} | {N} | eager {q} (model) | {_mb(e['loads'] / B)} | - | {_mb(e['stores'] / B)} | - | - "
                f"| {e['flops_exact'] / B / 1e9:.4f} (exact) | - | N x N written twice | {e['h100_bound']['seconds'] * 1e6:.1f} |"
            )
    nxn = result.get("nxn_check")
    if nxn:
        lines += ["", f"## N x N check (torch ops recorded on the op path, shape {nxn['shape']})", "",
                  "| path | ops | N x N-sized outputs | largest output |", "|---|---|---|---|"]
        for path, r in nxn["paths"].items():
            lines.append(f"| {path} | {r['ops']} | {len(r['nxn_outputs'])} | {r['largest_output']} |")
    lines.append("")
    return "\n".join(lines)
