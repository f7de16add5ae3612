"""Model-level GPU suite: timm DeiT-T/S/B at 224, ViT-B/16 at 384, the RoPE ViT-S/16 (timm ``Eva``) at 224
and a CLIP ViT-B/16 vision encoder (Hugging Face) at 224, at batch 1 and at a batch that fills the GPU: unpatched vs pruneattn (var, mad; keep 0.7 and 0.5; drop and fuse) vs the EViT-style
eager patch. Images/s, latency, peak memory, one training step (forward, loss, backward, SGD step,
bf16 autocast). Timed with ``triton.testing.do_bench``; every baseline in the same run.

``smoke=True`` runs a tiny DeiT (64 x 64 images) with two configurations, once: on the CPU under
``TRITON_INTERPRET=1`` that exercises this suite's plumbing in seconds.
"""
from __future__ import annotations

import torch

from pruneattn._progress import progress_bar
from pruneattn.bench import models as M
from pruneattn.bench.meta import environment
from pruneattn.bench.timing import peak_cuda_memory, time_fns

CASES = (
    ("deit_tiny_patch16_224", 224, 256),
    ("deit_small_patch16_224", 224, 256),
    ("deit_base_patch16_224", 224, 256),
    ("vit_base_patch16_384", 384, 64),
    ("vit_small_patch16_rope_224", 224, 256),
    ("hf:clip_vit_b16", 224, 128),
)
SMOKE_CASES = (("deit_tiny_patch16_224", 64, 2),)
CONFIGS = (
    M.UNPATCHED,
    *(M.pruned(stat, keep, mode) for stat in ("var", "mad") for keep in (0.7, 0.5) for mode in ("drop", "fuse")),
    M.evit_style("var", 0.7), M.evit_style("var", 0.5),
)
SMOKE_CONFIGS = (M.UNPATCHED, M.pruned("var", 0.7), M.pruned("mad", 0.5, "fuse"), M.evit_style("var", 0.7))


def _train_step(model, x, opt, config, device):
    def step():
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast, M.forward_context(config):
            loss = M.training_loss(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run_models_gpu(device="cuda", cases=CASES, configs=CONFIGS, *, smoke: bool = False, train: bool = True,
                   dtype: torch.dtype | None = None, batch1: bool = True, progress: bool = True) -> dict:
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    rows: list[dict] = []
    work = [(name, size, fill) for name, size, fill in cases]
    it = progress_bar(work, enabled=progress, desc="models", unit="model")
    for name, size, fill in it:
        for batch in (fill, 1) if batch1 else (fill,):
            built, shape, x, forwards = M.prepare(name, configs, batch, size, device=device, dtype=dtype)
            t = time_fns(forwards, device, quick=smoke)
            base = t[M.UNPATCHED.name]["median_s"]
            evit = {c.keep_rate: t[c.name]["median_s"] for c in configs if c.eager}
            for c in configs:
                s = t[c.name]["median_s"]
                row = {
                    "suite": "models", "model": name, "img_size": size, "batch": batch, "config": c.name,
                    "dtype": str(dtype).replace("torch.", ""), "median_ms": s * 1e3, "images_per_s": batch / s,
                    "speedup": base / s, "flop_bound": M.flop_bound(shape, c),
                    "over_evit": evit[c.keep_rate] / s if c.keep_rate in evit else float("nan"),
                    "device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
                }
                if device.type == "cuda":
                    row["peak_mem_mb"] = peak_cuda_memory(forwards[c.name], device) / 2**20
                rows.append(row)
            del built
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if train:
            rows += _train_rows(name, size, max(1, fill // 4) if not smoke else 2, configs, device, env, smoke)
    return {"environment": env, "rows": rows}


def _train_rows(name, size, batch, configs, device, env, smoke):
    steps = {}
    train_configs = [c for c in configs if not c.patched or c.mode == "drop"]
    if smoke:
        train_configs = train_configs[:2]
    for c in train_configs:
        model = M.build(name, c, device=device, dtype=torch.float32, img_size=size).train()
        for m in model.modules():  # the fused attention cannot apply attention dropout
            if hasattr(m, "attn_drop"):
                m.attn_drop.p = 0.0
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x = M.images(batch, size, device=device)
        steps[c.name] = _train_step(model, x, opt, c, device)
    t = time_fns(steps, device, quick=smoke)
    base = t[M.UNPATCHED.name]["median_s"]
    return [{
        "suite": "models train step", "model": name, "img_size": size, "batch": batch, "config": c.name,
        "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
        "median_ms": t[c.name]["median_s"] * 1e3, "images_per_s": batch / t[c.name]["median_s"],
        "speedup": base / t[c.name]["median_s"],
        "device": env["device"], "torch": env["torch"], "triton": env["triton"], "date": env["date"],
    } for c in train_configs]


def plot(rows: list[dict], path: str) -> bool:
    """Speed-up over the unpatched model per (model, batch), one bar per configuration."""
    from pruneattn.bench.report import bar_plot

    inf = [r for r in rows if r["suite"] == "models"]
    if not inf:
        return False
    groups = list(dict.fromkeys((r["model"], r["img_size"], r["batch"]) for r in inf))
    configs = list(dict.fromkeys(r["config"] for r in inf))
    series = {c: [next((r["speedup"] for r in inf if (r["model"], r["img_size"], r["batch"]) == g and r["config"] == c), 0.0)
                  for g in groups] for c in configs}
    labels = [f"{m.split('_patch')[0]} {s} b{b}" for m, s, b in groups]
    return bar_plot(path, f"speed-up over unpatched ({inf[0]['dtype']}, {inf[0]['device']})", labels, series, "x unpatched")
