"""Model-level CPU benchmark: whole models, unpatched vs pruned, with the CPU speed and memory targets.

DeiT-S at 224 (batch 16 and 1), ViT-S/16 at 384 (batch 8 and 1), the RoPE ViT-S/16 at 224 (batch 16,
timm ``Eva``) and a CLIP ViT-B/16 vision encoder at 224 (batch 8, Hugging Face), float32, 2 threads:
unpatched vs ``pruneattn.patch(model, keep_rate=0.7, layers=(3, 6, 9), stat="var")`` vs the EViT-style
eager patch.
Latency = median of interleaved repeats (time.perf_counter). Peak memory, two ways: the peak bytes
held by torch's CPU allocator during a forward (``torch.profiler`` memory events: deterministic; the
target is checked on it), and the resident-set peak of the forwards in a fresh subprocess per
configuration (``VmHWM`` reset before them; page-level, noisy by a few MB).

Targets: speed-up over unpatched >= 95% of the configuration's FLOP-count bound, >= 1.15x the
EViT-style patch, peak memory no higher than unpatched; batch 1 DeiT-S >= 1.3x lower latency;
DeiT-S batch 16 >= 1.4x.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pruneattn._progress import progress_bar
from pruneattn.bench import models as M
from pruneattn.bench.meta import environment, load_average
from pruneattn.bench.timing import time_cpu

CASES = (
    ("deit_small_patch16_224", 224, (16, 1)),
    ("vit_small_patch16_384", 384, (8, 1)),
    ("vit_small_patch16_rope_224", 224, (16,)),
    ("hf:clip_vit_b16", 224, (8,)),
)
SMOKE_CASES = (("deit_tiny_patch16_224", 64, (2,)),)
# Families of the modern encoders: DINOv3-S/16 (4 registers, rotary) and SigLIP2-B/16 fed a padded batch
# of 8 images of different sizes (up to 256 patches; see models.NAFLEX_GRIDS).
FAMILY_CASES = (("hf:dinov3_vits16", 224, (16,)), ("hf:siglip2_b16_naflex", 256, (8,)))
FAMILY_SMOKE_CASES = (("hf:siglip2_b16_naflex", 64, (3,)),)
CONFIGS = (M.UNPATCHED, M.pruned("var", 0.7), M.evit_style("var", 0.7))
TARGETS = {"bound_fraction": 0.95, "over_evit": 1.15, "batch1_deit_s": 1.3, "deit_s_b16": 1.4}


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _child(args: dict) -> dict:
    """Run in a fresh process: build, run the forwards, report the resident-set peak of the forwards.

    Linux: the high-water mark (VmHWM) is reset to the current RSS just before the forwards (writing
    5 to /proc/self/clear_refs), so ``forward_peak_mb`` = VmHWM after them - RSS before them: the
    memory the forwards themselves needed (activations, temporaries), without the process's import /
    model-building peaks that would otherwise hide it; a batch-1 forward first takes the one-time
    costs (the custom ops' first call imports torch._dynamo: ~8 MB of code, not activations).
    Elsewhere: ``ru_maxrss`` (the whole process).
    """
    import gc
    import resource

    torch.set_num_threads(args["threads"])
    cfg = M.Config(**{**args["config"], "layers": tuple(args["config"]["layers"])})
    model = M.build(args["model"], cfg, img_size=args["img_size"])
    x = M.inputs(args["model"], args["batch"], args["img_size"])
    with torch.no_grad(), M.forward_context(cfg):  # one-time costs (lazy imports: torch._dynamo ...) first
        model(*M.first(x))
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        method = "VmHWM reset before the forwards"
    except OSError:
        method = "ru_maxrss (whole process)"
    before = _status_kb("VmRSS")
    with torch.no_grad(), M.forward_context(cfg):
        for _ in range(args["runs"]):
            model(*x)
    hwm = _status_kb("VmHWM") if method.startswith("VmHWM") else None
    if hwm is None or before is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss_mb": peak / 1024, "forward_peak_mb": float("nan"), "memory_method": "ru_maxrss (whole process)"}
    return {"peak_rss_mb": hwm / 1024, "forward_peak_mb": (hwm - before) / 1024, "memory_method": method}


def block_times(model: torch.nn.Module, shape: dict, config: M.Config, batch: int, reps: int) -> dict:
    """Times of one unpatched block's halves (attention half, MLP half) at every token count of the
    pruned schedule: what a pruned model's blocks would cost with no pruning overhead at all."""
    attn_half, mlp_half = M.block_halves(model)
    sched = M.token_schedule(shape, config)
    counts = sorted({n for pair in sched for n in pair} | {sched[0][0]})
    g = torch.Generator().manual_seed(0)
    xs = {n: torch.randn(batch, n, shape["dim"], generator=g) for n in counts}
    fns = {}
    for n in counts:
        fns[("attn", n)] = lambda n=n: attn_half(xs[n])
        fns[("mlp", n)] = lambda n=n: mlp_half(xs[n])
    with torch.no_grad():
        t = time_cpu(fns, reps=reps, warmup=1, settle=True)
    return {key: v["median_s"] for key, v in t.items()}


def block_time_bound(unpatched_s: float, shape: dict, config: M.Config, times: dict) -> float:
    """Speed-up over the unpatched model if each block took the unpatched block's measured time at its
    token counts (patch embedding, norm and head unchanged): the FLOP bound corrected for how GEMM
    efficiency changes with size; the gap to it is the cost of pruning itself."""
    sched = M.token_schedule(shape, config)
    n0 = sched[0][0]
    full = shape["depth"] * (times[("attn", n0)] + times[("mlp", n0)])
    pruned = sum(times[("attn", a)] + times[("mlp", m)] for a, m in sched)
    return unpatched_s / (unpatched_s - full + pruned)


def allocator_peak(model: torch.nn.Module, config: M.Config, x: torch.Tensor | tuple) -> float:
    """Peak bytes held by torch's CPU allocator during one forward, above what was held before it (MiB).

    A batch-1 forward runs first so that one-time allocations are not counted; see :func:`allocator_peak_of`.
    """
    x = x if isinstance(x, tuple) else (x,)

    def forward():
        with torch.no_grad(), M.forward_context(config):
            return model(*x)

    with torch.no_grad(), M.forward_context(config):
        model(*M.first(x))
    return allocator_peak_of(forward)


def allocator_peak_of(fn) -> float:
    """Peak bytes held by torch's CPU allocator while ``fn()`` runs, above what was held before it (MiB).

    From ``torch.profiler`` with ``profile_memory=True``: its ``[memory]`` events carry the running
    "Total Allocated"; deterministic (tensor allocations only, no allocator caching or page effects).
    """
    import json
    import tempfile

    from pruneattn.bench.quiet import profiler_noise_filtered

    with profiler_noise_filtered(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                            profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    if not totals:
        return float("nan")
    first = next(e for e in events if e.get("name") == "[memory]")
    start = first["args"]["Total Allocated"] - max(0, first["args"].get("Bytes", 0))
    return (max(totals) - start) / 2**20


def peak_memory(model: str, img_size: int, batch: int, config: M.Config, threads: int, runs: int = 2) -> dict:
    args = {"model": model, "img_size": img_size, "batch": batch, "threads": threads, "runs": runs,
            "config": {**config.__dict__, "layers": list(config.layers)}}
    code = "import json, sys; from pruneattn.bench.models_cpu import _child; print(json.dumps(_child(json.loads(sys.argv[1]))))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_models_cpu(cases=CASES, configs=CONFIGS, *, reps: int = 9, smoke: bool = False, threads: int = 2,
                   memory: bool = True, progress: bool = True) -> dict:
    torch.set_num_threads(threads)
    env = environment("cpu")
    rows: list[dict] = []
    work = [(name, size, b) for name, size, batches in cases for b in batches]
    it = progress_bar(work, enabled=progress, desc="cpu models", unit="case")
    for name, size, batch in it:
        built, shape, x, forwards = M.prepare(name, configs, batch, size)
        t = time_cpu(forwards, reps=1 if smoke else reps, warmup=0 if smoke else 1)
        base = t[M.UNPATCHED.name]["median_s"]
        evit = next((t[c.name]["median_s"] for c in configs if c.eager), None)
        patched = next((c for c in configs if c.patched), None)
        halves = patched is not None and M.has_block_halves(built[M.UNPATCHED.name])
        btimes = block_times(built[M.UNPATCHED.name], shape, patched, batch, 1 if smoke else reps) if halves else {}
        for c in configs:
            s = t[c.name]["median_s"]
            bound = M.flop_bound(shape, c)
            row = {
                "suite": "cpu models", "model": name, "img_size": size, "batch": batch, "config": c.name,
                "dtype": "float32", "tokens": shape["num_patches"] + shape["num_prefix"],
                "median_ms": s * 1e3, "q1_ms": t[c.name]["q1_s"] * 1e3, "q3_ms": t[c.name]["q3_s"] * 1e3,
                "reps": t[c.name]["reps"], "images_per_s": batch / s,
                "speedup": base / s, "flop_bound": bound, "bound_fraction": (base / s) / bound,
                "block_time_bound": block_time_bound(base, shape, c, btimes) if btimes else float("nan"),
                "gflops_per_image": M.model_flops(shape, c) / 1e9,
                "over_evit": (evit / s) if evit else float("nan"),
                "device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
                "threads": threads,
            }
            if not smoke:  # the profiler pass costs more than a smoke run's timings
                row["alloc_peak_mb"] = allocator_peak(built[c.name], c, x)
            if memory:
                row.update(peak_memory(name, size, batch, c, threads, runs=1 if smoke else 2))
            rows.append(row)
        del built
    return {"environment": env, "rows": rows, "checks": checks(rows), "load_average_end": load_average()}


def checks(rows: list[dict]) -> list[dict]:
    """Each target, its measured value and whether it is met (no pass/fail test uses these)."""
    out = []
    by = {(r["model"], r["batch"], r["config"]): r for r in rows}
    for r in rows:
        if not r["config"].startswith("pruneattn"):
            continue
        un = by.get((r["model"], r["batch"], M.UNPATCHED.name))
        c = {"model": r["model"], "batch": r["batch"], "config": r["config"],
             "speedup": r["speedup"], "flop_bound": r["flop_bound"], "bound_fraction": r["bound_fraction"],
             "block_time_bound": r["block_time_bound"],
             "bound_ok": r["bound_fraction"] >= TARGETS["bound_fraction"],
             "over_evit": r["over_evit"], "over_evit_ok": r["over_evit"] >= TARGETS["over_evit"]}
        if un and "alloc_peak_mb" in r and "alloc_peak_mb" in un:
            c["alloc_peak_mb"], c["unpatched_alloc_peak_mb"] = r["alloc_peak_mb"], un["alloc_peak_mb"]
            c["memory_ok"] = r["alloc_peak_mb"] <= un["alloc_peak_mb"]
        if "forward_peak_mb" in r and un and "forward_peak_mb" in un:
            c["rss_forward_peak_mb"], c["unpatched_rss_forward_peak_mb"] = r["forward_peak_mb"], un["forward_peak_mb"]
        if r["model"].startswith("deit_small") and r["batch"] == 1:
            c["batch1_ok"] = r["speedup"] >= TARGETS["batch1_deit_s"]
        if r["model"].startswith("deit_small") and r["batch"] == 16:
            c["deit_s_b16_ok"] = r["speedup"] >= TARGETS["deit_s_b16"]
        out.append(c)
    return out


def plot(rows: list[dict], path: str) -> bool:
    from pruneattn.bench.report import bar_plot

    groups = list(dict.fromkeys((r["model"], r["img_size"], r["batch"]) for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    series = {c: [next((r["speedup"] for r in rows if (r["model"], r["img_size"], r["batch"]) == g and r["config"] == c), 0.0)
                  for g in groups] for c in configs}
    series["FLOP-count bound (pruneattn config)"] = [
        next((r["flop_bound"] for r in rows if (r["model"], r["img_size"], r["batch"]) == g and r["config"].startswith("pruneattn")), 0.0)
        for g in groups]
    labels = [f"{m.split('_patch')[0]} {s} b{b}" for m, s, b in groups]
    return bar_plot(path, f"speed-up over unpatched (CPU, {rows[0]['threads']} threads, fp32)", labels, series, "x unpatched")
