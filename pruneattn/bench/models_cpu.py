"""Model-level CPU benchmark (issue 7, part 4; issue 3's speed target).

DeiT-S at 224 (batch 16 and 1) and ViT-S/16 at 384 (batch 8 and 1), float32, 2 threads: unpatched vs
``pruneattn.patch(model, keep_rate=0.7, layers=(3, 6, 9), stat="var")`` vs the EViT-style eager patch.
Latency = median of interleaved repeats (time.perf_counter); peak memory = the peak resident set
(``ru_maxrss``) of a fresh subprocess per configuration that builds the model and runs the same
forward passes (so that no configuration inherits another's heap).

Targets: speed-up over unpatched >= 95% of the configuration's FLOP-count bound, >= 1.15x the
EViT-style patch, peak memory no higher than unpatched; batch 1 DeiT-S >= 1.3x lower latency;
DeiT-S batch 16 >= 1.4x (issue 3).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from pruneattn.bench import models as M
from pruneattn.bench.meta import environment
from pruneattn.bench.timing import time_cpu

CASES = (("deit_small_patch16_224", 224, (16, 1)), ("vit_small_patch16_384", 384, (8, 1)))
SMOKE_CASES = (("deit_tiny_patch16_224", 64, (2, 1)),)
CONFIGS = (M.UNPATCHED, M.pruned("var", 0.7), M.evit_style("var", 0.7))
TARGETS = {"bound_fraction": 0.95, "over_evit": 1.15, "batch1_deit_s": 1.3, "deit_s_b16_issue3": 1.4}


def _child(args: dict) -> dict:
    """Run in a fresh process: build, run the forwards, report the resident-set peak."""
    import resource

    torch.set_num_threads(args["threads"])
    cfg = M.Config(**{**args["config"], "layers": tuple(args["config"]["layers"])})
    model = M.build(args["model"], cfg, img_size=args["img_size"])
    x = M.images(args["batch"], args["img_size"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad(), M.forward_context(cfg):
        for _ in range(args["runs"]):
            model(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": peak / 1024, "before_forward_rss_mb": before / 1024}


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
    it = work
    if progress:
        from tqdm import tqdm

        it = tqdm(work, desc="cpu models", unit="case")
    for name, size, batch in it:
        built = {c.name: M.build(name, c, img_size=size) for c in configs}
        shape = M.model_shape(built[configs[0].name])
        x = M.images(batch, size)
        for c in configs:
            M.check_tokens(built[c.name], c, shape, x)

        def runner(c):
            model = built[c.name]

            def run():
                with torch.no_grad(), M.forward_context(c):
                    return model(x)
            return run

        t = time_cpu({c.name: runner(c) for c in configs}, reps=1 if smoke else reps, warmup=0 if smoke else 1)
        base = t[M.UNPATCHED.name]["median_s"]
        evit = next((t[c.name]["median_s"] for c in configs if c.eager), None)
        for c in configs:
            s = t[c.name]["median_s"]
            bound = M.flop_bound(shape, c)
            row = {
                "suite": "cpu models", "model": name, "img_size": size, "batch": batch, "config": c.name,
                "dtype": "float32", "tokens": shape["num_patches"] + shape["num_prefix"],
                "median_ms": s * 1e3, "q1_ms": t[c.name]["q1_s"] * 1e3, "q3_ms": t[c.name]["q3_s"] * 1e3,
                "reps": t[c.name]["reps"], "images_per_s": batch / s,
                "speedup": base / s, "flop_bound": bound, "bound_fraction": (base / s) / bound,
                "gflops_per_image": M.model_flops(shape, c) / 1e9,
                "over_evit": (evit / s) if evit else float("nan"),
                "device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
                "threads": threads,
            }
            if memory:
                row.update(peak_memory(name, size, batch, c, threads, runs=1 if smoke else 2))
            rows.append(row)
        del built
    return {"environment": env, "rows": rows, "checks": checks(rows)}


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
             "bound_ok": r["bound_fraction"] >= TARGETS["bound_fraction"],
             "over_evit": r["over_evit"], "over_evit_ok": r["over_evit"] >= TARGETS["over_evit"]}
        if "peak_rss_mb" in r and un and "peak_rss_mb" in un:
            c["peak_rss_mb"], c["unpatched_peak_rss_mb"] = r["peak_rss_mb"], un["peak_rss_mb"]
            c["memory_ok"] = r["peak_rss_mb"] <= un["peak_rss_mb"]
        if r["model"].startswith("deit_small") and r["batch"] == 1:
            c["batch1_ok"] = r["speedup"] >= TARGETS["batch1_deit_s"]
        if r["model"].startswith("deit_small") and r["batch"] == 16:
            c["issue3_ok"] = r["speedup"] >= TARGETS["deit_s_b16_issue3"]
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
