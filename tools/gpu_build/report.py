"""Markdown reports: the kernel account and the GPU build."""
from __future__ import annotations

from pruneattn.bench.roofline import H100
from tools.gpu_build.account import BOUND_BATCH, HEAD_DIM


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


# ----------------------------------------------------------------------------- GPU build


def _kb(x: float) -> str:
    return f"{x / 1024:.1f}"


def _config_str(cfg: dict) -> str:
    meta = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("num_warps", "num_stages"))
    return f"{meta}{', ' if meta else ''}w{cfg['num_warps']} s{cfg['num_stages']}"


def build_summary(rows: list[dict]) -> list[dict]:
    """One line per (kernel, arch, dtype): the variants, and the worst figure among those the prune keeps."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("candidate") is not None:
            groups.setdefault((r["kernel"], r["arch"], r["dtype"]), []).append(r)
    out = []
    for (kernel, arch, dtype), rs in groups.items():
        ok = [r for r in rs if not r["error"]]
        kept = [r for r in ok if r.get("kept_by_prune", True)]
        dots16 = [r for r in kept if r["dot_bits"] and max(r["dot_bits"]) <= 16]
        tcs = sorted({r["tensor_cores"] for r in dots16 if r["tensor_cores"]})
        no_tc = sum(not r["tensor_cores"] for r in dots16)
        ctas = [r["occupancy"]["ctas_per_sm"] for r in kept]
        out.append({
            "kernel": kernel, "arch": arch, "dtype": dtype,
            "head dims": ",".join(str(d) for d in sorted({r["head_dim"] for r in rs if r["head_dim"]})) or "any",
            "compiled": len(rs),
            "errors": len(rs) - len(ok),
            "kept": len(kept),
            "max regs (kept)": max((r["registers"] for r in kept), default="-"),
            "spills: kept / all": f"{sum(r['spill_bytes'] > 0 for r in kept)} / {sum(r['spill_bytes'] > 0 for r in ok)}",
            "max spill B (kept)": max((r["spill_bytes"] for r in kept), default=0),
            "16-bit tl.dot on tensor cores": (", ".join(tcs) + (f"; {no_tc} without" if no_tc else "")) if dots16
            else ("no tl.dot" if not any(r["dot_bits"] for r in rs) else "- (fp32: FMA)"),
            "max smem KB (kept)": _kb(max((r["shared_bytes"] for r in kept), default=0)),
            "kept over smem": sum(not r["smem_fits"] for r in kept),
            "CTAs/SM (kept)": f"{min(ctas)}-{max(ctas)}" if ctas else "-",
        })
    arch_order = {a: i for i, a in enumerate(dict.fromkeys(r["arch"] for r in rows))}
    return sorted(out, key=lambda r: (r["kernel"], r["dtype"], arch_order[r["arch"]]))


def shape_rows(build_rows: list[dict], shapes: list[dict], arch: str, sms: int) -> list[dict]:
    """The fused attention kernels at each standard shape: the kernel account's H100 bound of the path
    beside each autotune candidate's registers, CTAs per SM and waves of CTAs over the GPU."""
    out = []
    for sh in shapes:
        H, N, d, B = sh["H"], sh["N"], sh["d"], sh["bound_batch"]
        for dtype in ("bfloat16", "float16"):
            for kernel, store_cls, path in (("attention_fwd", True, "fused cls (var)"),
                                            ("attention_fwd", False, "fused mean (var)"),
                                            ("column_mean", None, "fused mean (var)")):
                cells, capped = [], []
                for r in build_rows:
                    if (r["kernel"] != kernel or r["arch"] != arch or r["dtype"] != dtype or r["head_dim"] != d
                            or r["error"] or r.get("candidate") is None
                            or (store_cls is not None and r["constexprs"].get("STORE_CLS") != store_cls)):
                        continue
                    cfg, occ = r["config"], r["occupancy"]
                    rows_per_cta = cfg["BLOCK_M"] if kernel == "attention_fwd" else cfg["BLOCK_N"]
                    grid = -(-N // rows_per_cta) * B * H
                    waves = grid / (sms * occ["ctas_per_sm"])
                    mark = "" if r.get("kept_by_prune", True) else " (pruned)"
                    cells.append(f"c{r['candidate']}: {r['registers']} regs, {occ['ctas_per_sm']}/SM, {waves:.1f} waves{mark}")
                    limits = {"registers", "shared_memory"} & set(occ["limited_by"])
                    if occ["ctas_per_sm"] == 1 and limits:
                        capped.append(f"c{r['candidate']} ({'+'.join(sorted(limits))})")
                if not cells:
                    continue
                bound = sh["pipelines"][path]
                name = kernel + {True: "[cls]", False: "[mean]", None: ""}[store_cls]
                out.append({
                    "dtype": dtype, "H": H, "N": N, "kernel": name, "path": path,
                    "path bound us (floor)": f"{bound['h100_bound_kernel']['seconds'] * 1e6:.1f} "
                                             f"({bound['h100_bound_floor']['seconds'] * 1e6:.1f})",
                    "candidates: registers, CTAs per SM, waves": "; ".join(cells),
                    "1 CTA/SM": ", ".join(capped) or "none",
                })
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """One line per arch: compile errors, and among the kept candidates spills, missing tensor cores, overflows."""
    lines = []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        rs = [r for r in rows if r["arch"] == arch and r.get("candidate") is not None]
        kept = [r for r in rs if not r["error"] and r.get("kept_by_prune", True)]
        spills = [r for r in kept if r["spill_bytes"] > 0]
        dots = [r for r in kept if r["dot_bits"] and max(r["dot_bits"]) <= 16]
        worst = max((r["spill_bytes"] for r in spills), default=0)
        lines.append(
            f"- **{arch}**: {sum(bool(r['error']) for r in rs)} compile errors in {len(rs)} variants; of the "
            f"{len(kept)} the prune keeps, {len(spills)} spill (at most {worst} bytes per thread), "
            f"{sum(not r['tensor_cores'] for r in dots)} of {len(dots)} with 16-bit `tl.dot` lack tensor-core "
            f"MMAs, {sum(not r['smem_fits'] for r in kept)} exceed the shared memory per CTA")
    return lines


OCCUPANCY_FORMULA = (
    "CTAs per SM = min(floor(floor(65536 / ceil_256(regs * 32)) / num_warps), "
    "floor(smem_per_SM / (smem + 1024)), floor(2048 / (32 * num_warps)), 32): registers are allocated "
    "per warp in units of 256 and a CTA needs all its warps' registers; the runtime reserves 1 KB of "
    "shared memory per CTA"
)


def build_markdown(result: dict) -> str:
    """The GPU build report: limits, summary, standard shapes, and every variant."""
    from pruneattn.bench.report import markdown_table

    env = result["environment"]
    rows = result["rows"]
    smoke = " (smoke run)" if result.get("smoke") else ""
    lines = [
        f"# GPU build: every Triton kernel variant compiled for {', '.join(result['archs'])} without a GPU{smoke}",
        "",
        f"- date {env['date']}, torch {env['torch']}, triton {env['triton']}, built on {env['device']}",
        f"- variants from the launch code: the public ops run in Triton's interpreter over dtypes "
        f"{', '.join(result['sweep']['dtypes'])} (bfloat16: the float16 launches with bfloat16 tensors; the "
        f"interpreter has none), head dims {', '.join(str(d) for d in result['sweep']['head_dims'])}, statistics "
        f"var / mad / mean, queries cls / mean, the fused and SDPA + class-row backends, modes drop / fuse, "
        f"and the standard shapes {', '.join(f'H={h} N={n}' for h, n in result['sweep']['shapes'])}; "
        f"{result['launches']} distinct launches, {len(rows)} compilations",
        f"- each launch compiled with {result['candidates']}; \"kept\": the kernel's `early_config_prune` keeps the "
        "candidate for that dtype and that arch's shared memory (float32 has its own, smaller tiles: its `tl.dot` "
        "runs as IEEE FMAs with the operands in registers); the summary's figures are over the kept candidates",
        "- registers, spills (stack frame + local memory per thread) and static shared memory from "
        "`cuobjdump --dump-resource-usage`; "
        "dynamic shared memory from Triton's metadata; tensor cores from the PTX's MMA instructions",
        f"- occupancy: {OCCUPANCY_FORMULA}",
        "- **what this shows**: whether every variant compiles for these GPUs, and for the candidates the prune keeps: "
        "spills, tensor-core MMAs for every 16-bit `tl.dot`, shared memory within the arch's limit, occupancy; "
        "**what it does not**: timings, or correctness on a GPU (the interpreter tests check the values)",
        "",
        *verdicts(rows),
        "",
    ]
    if result.get("skipped_archs"):
        lines += [f"- not built: {a}: {why}" for a, why in result["skipped_archs"].items()] + [""]
    lines += ["## Limits per arch", "",
              markdown_table([{"arch": a["name"], "GPU": a["gpu"], "smem per CTA KB": _kb(a["smem_per_block"]),
                               "smem per SM KB": _kb(a["smem_per_sm"]), "registers per SM": a["regs_per_sm"],
                               "max regs/thread": a["max_regs_per_thread"], "threads per SM": a["threads_per_sm"],
                               "SMs": a["sms"]} for a in result["arch_limits"]],
                             ["arch", "GPU", "smem per CTA KB", "smem per SM KB", "registers per SM",
                              "max regs/thread", "threads per SM", "SMs"]), ""]
    summary = build_summary(rows)
    lines += ["## Summary", "", markdown_table(summary, list(summary[0]) if summary else []), ""]
    if result.get("shape_rows"):
        sr = result["shape_rows"]
        lines += [f"## Standard shapes: the fused attention kernels on {result['shape_arch']} at d = {result['shape_head_dim']}",
                  "",
                  f"Batch {result['bound_batch']}. Per candidate cN (index into the kernel's autotune configs): "
                  f"registers per thread, CTAs per SM, and waves = grid CTAs / ({result['shape_sms']} SMs x CTAs per SM), "
                  "with grid CTAs = blocks of rows x batch x H. The bound (microseconds; a model, not a measurement: "
                  "max(unique bytes / 3.35 TB/s, dot FLOPs / 989 TFLOP/s)) is the whole path's, from the kernel "
                  "account (float16 counts; bfloat16 moves the same bytes); its floor in brackets. \"1 CTA/SM\": "
                  "candidates whose registers or shared memory leave room for a single CTA per SM.",
                  "", markdown_table(sr, list(sr[0])), ""]
    cols = ["kernel", "arch", "dtype", "head_dim", "constants", "candidate", "config", "kept", "registers",
            "spill_bytes", "local_stores", "smem KB", "smem estimate KB", "tensor_cores", "CTAs/SM", "limited by", "error"]
    table = []
    for r in rows:
        consts = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items()
                           if not k.startswith(("stride_", "DTYPE_KEY", "HEAD_DIM", "BLOCK_D")))
        occ = r.get("occupancy") or {}
        table.append({**r, "constants": consts, "config": _config_str(r["config"]),
                      "candidate": "-" if r.get("candidate") is None else r["candidate"],
                      "kept": "-" if r.get("candidate") is None else ("yes" if r.get("kept_by_prune") else "no"),
                      "smem KB": _kb(r["shared_bytes"]) if not r["error"] else "-",
                      "smem estimate KB": "-" if r.get("smem_estimate") is None else _kb(r["smem_estimate"]),
                      "tensor_cores": r.get("tensor_cores") or "-",
                      "CTAs/SM": occ.get("ctas_per_sm", "-"), "limited by": "+".join(occ.get("limited_by", [])),
                      "error": r["error"] or ""})
    lines += ["## Every variant", "", markdown_table(table, cols), ""]
    return "\n".join(lines)
