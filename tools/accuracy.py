"""Accuracy of attention-diversity pruning on Fashion-MNIST (the paper's experiment at small scale).

Run from the repository root: ``python tools/accuracy.py --part a|b|c|t|f [options]``, then
``python tools/accuracy.py --report`` (results in ``benchmarks/results/``; ``--help`` lists the options).

The shipped model (``pruneattn/fashion_mnist/data/vit_fmnist_canvas56.pt``, see ``python -m pruneattn.fashion_mnist.train``) is
evaluated on the full test set (10,000 images, 56 x 56 canvas view, seed 0) with pruning after the
attention of blocks 3 / 6 / 9:

  --part a   no fine-tuning: keep rates 1.0 / 0.9 / 0.7 / 0.5 / 0.3, scores var / mad / mean (EViT's rule)
             and random (3 seeds), modes drop and fuse.
  --part b   short fine-tuning with pruning on (``--ft-epochs``, default 2; keep 0.5, drop; var / mad /
             mean / random, and an unpruned fine-tuning control with the same schedule), ``--seeds`` seeds each.
  --part c   overlapping patch embedding (``pruneattn.overlap_patches``, kernel 7 stride 6 padding 2:
             9 x 9 = 81 patches) + keep 0.5, against the plain embedding at keep 0.7 (about the same
             number of token-blocks), both fine-tuned the same way.
  --part t   throughput only, every configuration interleaved round by round (best round kept).
  --part f   where the kept patches are: share of object (non-background) patches among the kept ones.
  --report   merge the parts' JSON into ``benchmarks/results/accuracy.md`` and ``accuracy.png``.
  --report-heads  the same scores on models with other head counts (``--weights`` of a model trained
             with ``--heads``; each model's parts in ``benchmarks/results/heads/h<heads>/``): the var - MAD
             (and mean - var) gap against the number of heads, in ``heads/heads.md`` and ``heads.png``.
             Gaps without fine-tuning carry a 95% interval from the paired per-image results (every
             evaluation row stores which test images it got right).

Parts b and c are long on a CPU (one fine-tuning is minutes); split them into shards that run side by
side with ``--seed-list``, ``--stat-list`` (and ``--c-runs``, ``--no-zero-epoch`` for part c), each
writing ``--out results/accuracy_<part>_<name>.json``: the report joins ``accuracy_<part>.json`` and
every ``accuracy_<part>_*.json``.

Random pruning (the control): the blocks are patched with ``stat="mean"`` and a ``score_hook`` that
replaces their scores by uniform random numbers from a seeded generator (so random keeps a random subset; in fuse mode the fused token still uses the class
attention as weights). Nothing else changes.

Throughput is images/s of the model forward on this machine (CPU, ``--threads`` torch threads,
batch 256): the whole pass, and the median over batches. On a shared machine it is noisy.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pruneattn
from pruneattn.fashion_mnist import datasets
from pruneattn.fashion_mnist.demo import training_command
from pruneattn.fashion_mnist.train import DEFAULT_WEIGHTS, evaluate, load_model, train
from pruneattn.validate import MODES, STATS

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
LAYERS = (3, 6, 9)
KEEP_RATES = (1.0, 0.9, 0.7, 0.5, 0.3)


# ----------------------------------------------------------------------------- random-pruning control


def random_scores(layers, *, seed: int, mode: str):
    """A ``score_hook`` that replaces each pruning block's scores by seeded uniform random numbers: one
    generator per block (seed * 1000 + its rank), drawing one number per token after the prefix (the
    fused token of an earlier block too, whose number is not used), as the control always has."""
    order = sorted(layers)
    gens = {layer: torch.Generator().manual_seed(seed * 1000 + i) for i, layer in enumerate(order)}
    extra = {layer: int(mode == "fuse" and i > 0) for i, layer in enumerate(order)}

    def hook(layer: int, scores: torch.Tensor) -> torch.Tensor:
        B, P = scores.shape
        r = torch.rand((B, P + extra[layer]), generator=gens[layer], dtype=torch.float32)
        return r[:, :P].to(scores.device)

    return hook


def patch_model(model, *, keep_rate, stat, mode="drop", seed=0, layers=LAYERS):
    """``pruneattn.patch`` with ``stat`` in var / mad / mean, or ``"random"`` (see the module docstring)."""
    if stat != "random":
        return pruneattn.patch(model, keep_rate=keep_rate, layers=layers, stat=stat, query="cls", mode=mode)
    return pruneattn.patch(model, keep_rate=keep_rate, layers=layers, stat="mean", query="cls", mode=mode,
                           score_hook=random_scores(layers, seed=seed, mode=mode))


def unpatch_model(model):
    return pruneattn.unpatch(model)


# ----------------------------------------------------------------------------- measurements


@torch.no_grad()
def tokens_per_block(model, x) -> list[int]:
    """Number of tokens entering each block (measured with forward pre-hooks on one batch)."""
    counts = []
    hooks = [b.register_forward_pre_hook(lambda m, a: counts.append(int(a[0].shape[1]))) for b in model.blocks]
    try:
        model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


def run_eval(model, test, config, *, label: dict, device, progress=True) -> dict:
    images, labels = test
    x0 = datasets.normalize(datasets.make_view(images[:2], np.arange(2), canvas=config["canvas"], seed=0)).to(device)
    toks = tokens_per_block(model, x0)
    ev = evaluate(model, images, labels, config=config, device=device, progress=progress,
                  desc=" ".join(f"{k}={v}" for k, v in label.items()))
    row = dict(label, top1=ev["top1"], n=ev["n"], images_per_s=round(ev["images_per_s"], 1),
               images_per_s_median=round(ev["images_per_s_median"], 1), tokens_per_block=toks)
    print(json.dumps(row), flush=True)
    row["correct"] = pack_correct(ev["correct"])  # per image, for paired differences between rows
    return row


def pack_correct(correct: np.ndarray) -> str:
    """Which test images a row got right, as base64 of the packed bits (1,250 bytes for 10,000 images)."""
    return base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode("ascii")


def unpack_correct(row: dict) -> np.ndarray:
    """The bool per test image that :func:`pack_correct` stored in ``row``."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(row["correct"]), dtype=np.uint8))
    return bits[: row["n"]].astype(bool)


def part_a(model, config, test, args) -> list[dict]:
    stats, keeps = _stats(args, STATS + ("random",)), _keeps(args)
    rows = [run_eval(unpatch_model(model), test, config, device=args.device,
                     label=dict(part="a", stat="none", mode="-", keep=1.0, seed=None))]
    for keep in keeps:
        for mode in MODES:
            if keep == 1.0 and mode == "fuse":
                continue  # identical to drop at keep 1.0 (nothing is dropped)
            # keep 1.0 drops nothing, so every score gives the unpruned accuracy; run var only (its images/s
            # shows the cost of scoring inside the patched blocks).
            for stat in ("var",) if keep == 1.0 else stats:
                seeds = range(args.random_seeds) if stat == "random" else [None]
                for seed in seeds:
                    patch_model(model, keep_rate=keep, stat=stat, mode=mode, seed=seed or 0)
                    rows.append(run_eval(model, test, config, device=args.device,
                                         label=dict(part="a", stat=stat, mode=mode, keep=keep, seed=seed)))
    unpatch_model(model)
    return rows


def finetune_and_eval(weights, config, train_data, test, *, stat, keep, mode, seed, args, overlap=None) -> dict:
    model, _ = load_model(weights, device=args.device)
    if overlap is not None:
        pruneattn.overlap_patches(model, stride=overlap[0], padding=overlap[1])
    if stat != "none":
        patch_model(model, keep_rate=keep, stat=stat, mode=mode, seed=seed)
    t0 = time.perf_counter()
    info = train(model, *train_data, config=config, epochs=args.ft_epochs, batch_size=args.batch_size,
                 lr=args.ft_lr, warmup=args.ft_warmup, min_lr=args.ft_lr / 100, seed=seed, device=args.device,
                 progress=True)
    label = dict(part=args.part, stat=stat, mode=mode if stat != "none" else "-", keep=keep if stat != "none" else 1.0,
                 seed=seed, overlap=list(overlap) if overlap else None, ft_epochs=args.ft_epochs, ft_lr=args.ft_lr,
                 ft_steps=info["steps"], ft_seconds=round(time.perf_counter() - t0, 1))
    if stat == "random":  # the evaluation draws its own random keeps, from a seed-specific generator
        patch_model(model, keep_rate=keep, stat=stat, mode=mode, seed=100 + seed)
    return run_eval(model, test, config, label=label, device=args.device)


def _seeds(args) -> list[int]:
    return [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))


def _stats(args, default: tuple[str, ...]) -> tuple[str, ...]:
    if not args.stat_list:
        return default
    chosen = tuple(args.stat_list.split(","))
    unknown = set(chosen) - set(default)
    if unknown:
        raise SystemExit(f"--stat-list: {sorted(unknown)} not among {default}")
    return chosen


def _keeps(args) -> tuple[float, ...]:
    if not args.keep_list:
        return KEEP_RATES
    chosen = tuple(float(k) for k in args.keep_list.split(","))
    unknown = set(chosen) - set(KEEP_RATES)
    if unknown:
        raise SystemExit(f"--keep-list: {sorted(unknown)} not among {KEEP_RATES}")
    return chosen


def part_b(weights, config, train_data, test, args) -> list[dict]:
    rows = []
    for seed in _seeds(args):
        for stat in _stats(args, ("none",) + STATS + ("random",)):
            rows.append(finetune_and_eval(weights, config, train_data, test, stat=stat, keep=0.5, mode="drop",
                                          seed=seed, args=args))
    return rows


def part_c(weights, config, train_data, test, args) -> list[dict]:
    if not hasattr(pruneattn, "overlap_patches"):
        raise SystemExit("pruneattn.overlap_patches is not available in this checkout")
    runs = set(args.c_runs.split(","))
    if not runs <= {"overlap", "plain"}:
        raise SystemExit(f"--c-runs: {sorted(runs - {'overlap', 'plain'})} not among ['overlap', 'plain']")
    stats = _stats(args, ("var", "mad"))
    model, _ = load_model(weights, device=args.device)
    rows = []
    pruneattn.overlap_patches(model, stride=6, padding=2)
    if not args.no_zero_epoch:
        for stat in stats:
            patch_model(model, keep_rate=0.5, stat=stat, mode="drop")
            rows.append(run_eval(model, test, config, device=args.device,
                                 label=dict(part="c", stat=stat, mode="drop", keep=0.5, seed=None, overlap=[6, 2],
                                            ft_epochs=0)))
    for seed in _seeds(args):
        for stat in stats:
            if "overlap" in runs:
                rows.append(finetune_and_eval(weights, config, train_data, test, stat=stat, keep=0.5, mode="drop",
                                              seed=seed, args=args, overlap=(6, 2)))
            if "plain" in runs:
                rows.append(finetune_and_eval(weights, config, train_data, test, stat=stat, keep=0.7, mode="drop",
                                              seed=seed, args=args))
    return rows


@torch.no_grad()
def part_t(model, config, test, args) -> list[dict]:
    """Throughput only, all configurations interleaved round by round (fair on a machine whose load changes):
    each round runs every configuration on the same batch; best round per configuration is reported."""
    images, _ = test
    x = datasets.normalize(datasets.make_view(images[: args.t_batch], np.arange(args.t_batch),
                                              canvas=config["canvas"], seed=0)).to(args.device)
    configs = [("none", 1.0, "-")] + [("var", 1.0, "drop")] + [
        (stat, keep, mode) for keep in KEEP_RATES[1:] for mode in MODES for stat in STATS + ("random",)]
    best = {c: 0.0 for c in configs}
    toks = {}
    for rnd in range(args.t_rounds):
        for c in configs:
            stat, keep, mode = c
            if stat == "none":
                unpatch_model(model)
            else:
                patch_model(model, keep_rate=keep, stat=stat, mode=mode)
            model(x[:8])  # warm-up
            if c not in toks:
                toks[c] = tokens_per_block(model, x[:2])
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.t_iters):
                model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            best[c] = max(best[c], args.t_iters * x.shape[0] / (time.perf_counter() - t0))
        print(f"round {rnd + 1}/{args.t_rounds}: " + ", ".join(f"{c[0]}/{c[2]}/{c[1]} {best[c]:.0f}" for c in configs),
              flush=True)
    unpatch_model(model)
    base = best[configs[0]]
    return [dict(part="t", stat=c[0], mode=c[2], keep=c[1], images_per_s=round(v, 1), speedup=round(v / base, 3),
                 tokens_per_block=toks[c], batch=args.t_batch) for c, v in best.items()]


@torch.no_grad()
def part_f(model, config, test, args) -> list[dict]:
    """Where the kept patches are: the share of object patches (any non-zero pixel of the canvas patch)
    among the patches kept by each pruning block, per score, at keep ``args.f_keep`` (drop)."""
    images, _ = test
    p, grid = config["patch_size"], config["img_size"] // config["patch_size"]
    raw = datasets.make_view(images, np.arange(len(images)), canvas=config["canvas"], seed=0)
    fg = (raw.view(-1, grid, p, grid, p) > 0).any(dim=4).any(dim=2).reshape(len(images), -1)  # (n, P) bool
    rows = [dict(part="f", stat="all patches", keep=1.0, block=None, object_share=round(float(fg.float().mean()), 4))]
    for stat in STATS + ("random",):
        patch_model(model, keep_rate=args.f_keep, stat=stat, mode="drop")
        shares: dict[int, list] = {}
        for start in range(0, len(images), 256):
            model(datasets.normalize(raw[start : start + 256]).to(args.device))
            for block, idx in pruneattn.kept_indices(model).items():
                shares.setdefault(block, []).append(fg[start : start + 256].gather(1, idx.cpu()).float().sum().item())
        for block, vals in shares.items():
            k = pruneattn.kept_indices(model)[block].shape[1]
            row = dict(part="f", stat=stat, keep=args.f_keep, block=block, patches_kept=k,
                       object_share=round(sum(vals) / (k * len(images)), 4))
            rows.append(row)
            print(json.dumps(row), flush=True)
    unpatch_model(model)
    return rows


# ----------------------------------------------------------------------------- report


def _fmt_acc(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    return f"{100 * statistics.mean(vals):.2f} ± {100 * statistics.stdev(vals):.2f} (n={len(vals)})"


def _group(rows, keys):
    out: dict = {}
    for r in rows:
        key = tuple(tuple(v) if isinstance(v, list) else v for v in (r.get(k) for k in keys))
        out.setdefault(key, []).append(r)
    return out


def params_digest(state_dict: dict) -> str:
    """First 16 hex digits of a SHA-256 over the checkpoint's tensors (names, dtypes, shapes, values): equal for
    two trainings that gave the same parameters, whatever their logs and timings."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _check_same_weights(res: Path, part: str, files: list[Path], loaded: list[dict]) -> None:
    """Refuse to join shards of one part that come from different weights: a differing file name or parameter
    digest, or (part a, whose every shard evaluates the unpruned model first) unpruned rows that got other
    test images right."""
    names = {d["meta"]["weights"] for d in loaded}
    digests = {d["meta"]["params_sha256"] for d in loaded if d["meta"].get("params_sha256")}
    unpruned = {r["correct"] for d in loaded for r in d["rows"] if r["stat"] == "none" and "correct" in r}
    if len(names) > 1 or len(digests) > 1 or (part == "a" and len(unpruned) > 1):
        raise SystemExit(f"{res}: the part {part} files {[f.name for f in files]} come from different weights "
                         f"(names {sorted(names)}, parameter digests {sorted(digests)}); keep one model per folder")


def _load_part(res: Path, part: str) -> dict | None:
    """One part's results: ``accuracy_<part>.json`` or its shards ``accuracy_<part>_*.json`` (rows joined;
    the shards' commands kept in ``meta['commands']``)."""
    files = sorted(res.glob(f"accuracy_{part}.json")) + sorted(res.glob(f"accuracy_{part}_*.json"))
    if not files:
        return None
    loaded = [json.loads(f.read_text()) for f in files]
    _check_same_weights(res, part, files, loaded)
    meta = dict(loaded[0]["meta"], commands=[d["meta"]["command"] for d in loaded],
                core_seconds=sum(d["meta"].get("seconds", 0) * d["meta"].get("threads", 1) for d in loaded))
    return {"meta": meta, "rows": [r for d in loaded for r in d["rows"]]}


def report(args) -> None:
    res = Path(args.results)
    parts = {p: _load_part(res, p) for p in "abctf"}
    parts = {p: v for p, v in parts.items() if v is not None}
    lines = ["# Fashion-MNIST: accuracy of pruning (var / MAD / mean / random)", ""]
    meta = next(iter(parts.values()))["meta"] if parts else {}
    lines += [f"Model: `{meta.get('weights')}` ({meta.get('model_meta', {}).get('command', '?')}); "
              f"test set: {meta.get('n_test')} images, 56 x 56 canvas view (seed 0); pruning after the attention "
              f"of blocks 3 / 6 / 9; CPU, {meta.get('threads')} torch thread(s), batch 256, "
              f"torch {meta.get('torch')}. Throughput (images/s, median over batches) is from a machine shared "
              "with other jobs: noisy, compare within a table only. Spread = mean ± sample std over seeds.", ""]
    if "a" in parts:
        rows = parts["a"]["rows"]
        base = next(r for r in rows if r["stat"] == "none")
        lines += ["## (a) Trained model, no fine-tuning", "",
                  f"Unpruned (timm's own forward): top-1 **{100 * base['top1']:.2f}%**, "
                  f"{base['images_per_s_median']:.0f} images/s.", ""]
        for mode in MODES:
            lines += [f"### mode = {mode}", "",
                      "| keep | tokens per block (0..11) | var | mad | mean (EViT) | random (3 seeds) | images/s (var; noisy, see Throughput) |",
                      "|---|---|---|---|---|---|---|"]
            for keep in KEEP_RATES:
                m = "drop" if keep == 1.0 else mode
                g = _group([r for r in rows if r["keep"] == keep and r["mode"] == m], ["stat"])
                if not g:
                    continue
                cells = [_fmt_acc([r["top1"] for r in g.get((s,), [])]) if g.get((s,)) else "-"
                         for s in STATS + ("random",)]
                v = g.get(("var",), [{}])[0]
                lines.append(f"| {keep} | {' '.join(map(str, v.get('tokens_per_block', [])))} | " + " | ".join(cells)
                             + f" | {v.get('images_per_s_median', float('nan')):.0f} |")
            lines.append("")
        lines += ["### Differences in top-1 (percentage points; random = mean over its seeds)", "",
                  "| mode | keep | var - mean | mad - mean | var - random | mad - random | mad - var |",
                  "|---|---|---|---|---|---|---|"]
        for mode in MODES:
            for keep in KEEP_RATES[1:]:
                acc = {s: [r["top1"] for r in rows if r["keep"] == keep and r["mode"] == mode and r["stat"] == s]
                       for s in STATS + ("random",)}
                if not all(acc.values()):
                    continue
                m = {s: 100 * statistics.mean(v) for s, v in acc.items()}
                lines.append(f"| {mode} | {keep} | {m['var'] - m['mean']:+.2f} | {m['mad'] - m['mean']:+.2f} | "
                             f"{m['var'] - m['random']:+.2f} | {m['mad'] - m['random']:+.2f} | "
                             f"{m['mad'] - m['var']:+.2f} |")
        lines.append("")
    for p, title in (("b", "(b) After a short fine-tuning with pruning on (keep 0.5, drop)"),
                     ("c", "(c) Overlapping patch embedding + pruning (fine-tuned)")):
        if p not in parts:
            continue
        rows = parts[p]["rows"]
        seeds = sorted({r["seed"] for r in rows if r.get("ft_epochs")})
        lines += [f"## {title}", "", f"Fine-tuning: {parts[p]['meta'].get('ft')}; seeds {seeds}.", "",
                  "| overlap (stride, pad) | stat | keep | fine-tuned epochs | tokens per block | top-1 % | images/s |",
                  "|---|---|---|---|---|---|---|"]
        order = ("none",) + STATS + ("random",)
        groups = sorted(_group(rows, ["overlap", "stat", "keep", "ft_epochs"]).items(),  # shards come in any order
                        key=lambda kv: (kv[0][3] or 0, kv[0][0] is None, -kv[0][2], order.index(kv[0][1])))
        for key, g in groups:
            ov, stat, keep, ft = key
            lines.append(f"| {tuple(ov) if ov else '-'} | {stat} | {keep} | {ft} | "
                         f"{' '.join(map(str, g[0]['tokens_per_block']))} | {_fmt_acc([r['top1'] for r in g])} | "
                         f"{statistics.median(r['images_per_s_median'] for r in g):.0f} |")
        lines.append("")
    if "t" in parts:
        rows = parts["t"]["rows"]
        tm = parts["t"]["meta"]
        lines += ["## Throughput (interleaved measurement)", "",
                  f"Forward of one batch of {rows[0]['batch']} test images, {tm.get('threads')} torch thread(s), "
                  f"{tm.get('device')}; every configuration runs once per round, rounds repeated, best round kept "
                  "(`--part t`). Speed-up is against the unpatched model (timm's own SDPA forward) in the same run.",
                  "", "| keep | mode | tokens per block (0..11) | var | mad | mean | random |", "|---|---|---|---|---|---|---|"]
        base = next(r for r in rows if r["stat"] == "none")
        lines.append(f"| unpatched | - | {' '.join(map(str, base['tokens_per_block']))} | "
                     f"{base['images_per_s']:.0f} images/s (1.00x) | | | |")
        for (keep, mode), g in _group([r for r in rows if r["stat"] != "none"], ["keep", "mode"]).items():
            by = {r["stat"]: r for r in g}
            cells = [f"{by[s]['images_per_s']:.0f} ({by[s]['speedup']:.2f}x)" if s in by else "-"
                     for s in STATS + ("random",)]
            lines.append(f"| {keep} | {mode} | {' '.join(map(str, g[0]['tokens_per_block']))} | " + " | ".join(cells) + " |")
        lines.append("")
    if "f" in parts:
        rows = parts["f"]["rows"]
        allp = next(r for r in rows if r["stat"] == "all patches")
        keep = next(r["keep"] for r in rows if r["block"] is not None)
        lines += ["## Which patches are kept: share of object patches", "",
                  f"A patch is an object patch if any pixel of it is non-zero on the canvas; "
                  f"{100 * allp['object_share']:.1f}% of all patches are (the rest is empty background). Share of "
                  f"object patches among the patches each pruning block keeps, keep {keep}, drop, no fine-tuning "
                  "(`--part f`), full test set:", "",
                  "| score | " + " | ".join(f"after block {b}" for b in LAYERS) + " |", "|---|" + "---|" * len(LAYERS)]
        for stat, g in _group([r for r in rows if r["block"] is not None], ["stat"]).items():
            by = {r["block"]: r for r in g}
            lines.append(f"| {stat[0]} | " + " | ".join(f"{100 * by[b]['object_share']:.1f}% (of {by[b]['patches_kept']})"
                                                        for b in LAYERS) + " |")
        lines.append("")
    (res / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(parts, res)


def plot(parts, res: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "a" not in parts:
        return
    rows = parts["a"]["rows"]
    base = next(r for r in rows if r["stat"] == "none")
    ft_epochs = max((r.get("ft_epochs") or 0 for r in parts["b"]["rows"]), default=0) if "b" in parts else 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    colors = {"var": "C0", "mad": "C1", "mean": "C2", "random": "C7"}
    for ax, mode in zip(axes, MODES):
        for stat in STATS + ("random",):
            xs, ys, es = [], [], []
            for keep in KEEP_RATES:
                m = "drop" if keep == 1.0 else mode
                vals = [r["top1"] for r in rows if r["stat"] == stat and r["keep"] == keep and r["mode"] == m]
                if vals:
                    xs.append(keep)
                    ys.append(100 * statistics.mean(vals))
                    es.append(100 * statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=colors[stat],
                        label=stat + (" (EViT)" if stat == "mean" else " (3 seeds)" if stat == "random" else ""))
        if "b" in parts:
            for stat in STATS + ("random",):
                vals = [100 * r["top1"] for r in parts["b"]["rows"] if r["stat"] == stat]
                if vals and mode == "drop":
                    ax.errorbar([0.5 + 0.015 * (STATS + ("random",)).index(stat)], [statistics.mean(vals)],
                                yerr=[statistics.stdev(vals) if len(vals) > 1 else 0], marker="*", markersize=11,
                                color=colors[stat], capsize=3, linestyle="none")
        if "b" in parts and mode == "drop":
            vals = [100 * r["top1"] for r in parts["b"]["rows"] if r["stat"] == "none"]
            if vals:
                ax.errorbar([1.0], [statistics.mean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0],
                            marker="*", markersize=11, color="k", capsize=3, linestyle="none",
                            label="fine-tuned, unpruned control")
        ax.axhline(100 * base["top1"], color="k", linestyle=":", linewidth=1, label="unpruned")
        ax.set_xlabel("keep rate at blocks 3 / 6 / 9")
        ax.set_title(f"mode = {mode}" + (f"\nstars: keep 0.5 after {ft_epochs:g} epoch(s) of fine-tuning with pruning on,\n"
                                              "mean ± std over seeds (shifted left for legibility)"
                                              if mode == "drop" and "b" in parts else "\n"), fontsize=9)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    axes[1].legend(loc="lower left", fontsize=8)
    if "b" in parts:
        hl = [(h, lab) for h, lab in zip(*axes[0].get_legend_handles_labels()) if lab.startswith("fine-tuned")]
        if hl:
            axes[0].legend(*zip(*hl), loc="lower left", fontsize=8)
    fig.suptitle("Fashion-MNIST test set (56x56 canvas), ViT (12 blocks, width 128, 4 heads): pruning at blocks 3/6/9, "
                 "lines = no fine-tuning", fontsize=10)
    fig.tight_layout()
    fig.savefig(res / "accuracy.png", dpi=110)
    print(f"wrote {res / 'accuracy.png'}")


# ----------------------------------------------------------------------------- head-count report

HEADS_RESULTS = RESULTS / "heads"


def _paired_gap(a: dict, b: dict) -> tuple[float, float]:
    """Top-1 of row ``a`` minus row ``b`` on the same test images, in points, and its 95% half-width
    (1.96 standard errors of the per-image difference: the two rows are paired)."""
    d = unpack_correct(a).astype(float) - unpack_correct(b).astype(float)
    return 100 * d.mean(), 100 * 1.96 * d.std(ddof=1) / math.sqrt(len(d))


def _seed_gap(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """Mean of ``a`` minus mean of ``b`` (independent seeds) and its standard error; None under two seeds each."""
    if len(a) < 2 or len(b) < 2:
        return None
    return (statistics.mean(a) - statistics.mean(b),
            math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b)))


def _heads_parts(folder: Path) -> tuple[int, dict]:
    """(number of heads, {part: loaded}) of one head-count folder; parts it lacks are read from the
    results folder two levels up (``benchmarks/results/``) when they are results of the same weights
    (the shipped model's table)."""
    if not (folder / "accuracy_a.json").exists():
        raise SystemExit(f"{folder}: no accuracy_a.json (run --part a with --out {folder}/accuracy_a.json)")
    parts = {p: v for p in "abf" if (v := _load_part(folder, p)) is not None}
    weights = parts["a"]["meta"]["weights"]
    for p in "bf":
        main = _load_part(folder.parent.parent, p)
        if p not in parts and main is not None and main["meta"]["weights"] == weights:
            parts[p] = main
    return int(parts["a"]["meta"]["config"]["num_heads"]), parts


def report_heads(args) -> None:
    """``heads.md`` / ``heads.png``: the var - MAD (and mean) gap against the number of heads."""
    res = Path(args.heads_results)
    folders = sorted(p for p in res.iterdir() if p.is_dir() and (p / "accuracy_a.json").exists())
    models = dict(sorted(_heads_parts(f) for f in folders))
    lines = ["# Fashion-MNIST: does MAD score as well as variance with more heads?", "",
             "Models of the shipped recipe (12 blocks, MLP ratio 2, patch 7 on the 56 x 56 canvas, "
             "`python -m pruneattn.fashion_mnist.train`), one per head count; pruning after the attention of "
             "blocks 3 / 6 / 9, full test set, CPU. Without fine-tuning the scores are deterministic: the "
             "± after a difference is the 95% interval of the paired per-image difference on the 10,000 test "
             "images (how much another test set of this size could move it). After fine-tuning: mean ± "
             "sample std over seeds. CPU for these results: core-hours of the evaluations and fine-tunings below "
             "(each run's wall time times its threads), training not included.", "",
             "| heads | width | head dim | parameters | training | unpruned top-1 | CPU for these results | weights |",
             "|---|---|---|---|---|---|---|---|"]
    for h, parts in models.items():
        meta = parts["a"]["meta"]
        cfg, mm = meta["config"], meta.get("model_meta", {})
        base = next(r for r in parts["a"]["rows"] if r["stat"] == "none")
        params = f"{meta['parameters'] / 1e6:.2f} M" if "parameters" in meta else "?"
        trained = f"{mm.get('steps', '?')} steps"
        if "epochs" in mm:
            trained = f"{mm['epochs']:g} epochs ({trained})"
        evals = sum(p["meta"]["core_seconds"] for p in parts.values()) / 3600
        lines.append(f"| {h} | {cfg['embed_dim']} | {cfg['embed_dim'] // h} | {params} | "
                     f"{trained}, {mm.get('train_seconds', float('nan')) / 60:.0f} min | "
                     f"**{100 * base['top1']:.2f}%** | {evals:.1f} core-h | `{meta['weights']}` |")
    lines += ["", "Trained with:", "", "```",
              *[training_command(parts["a"]["meta"].get("model_meta", {})) for parts in models.values()], "```"]
    scores = STATS + (("random",) if any(r["stat"] == "random" for p in models.values() for r in p["a"]["rows"]) else ())
    lines += ["", "## No fine-tuning", "",
              "| mode | keep | heads | " + " | ".join(scores) + " | mad - var | mean - var |",
              "|---|---|---|" + "---|" * (len(scores) + 2)]
    gaps: dict = {}
    for mode in MODES:
        for keep in KEEP_RATES[1:]:
            for h, parts in models.items():
                rows = [r for r in parts["a"]["rows"] if r["keep"] == keep and r["mode"] == mode]
                by = {s: [r for r in rows if r["stat"] == s] for s in STATS + ("random",)}
                if not all(by[s] for s in STATS):
                    continue
                mad, mean = _paired_gap(by["mad"][0], by["var"][0]), _paired_gap(by["mean"][0], by["var"][0])
                gaps[mode, keep, h] = mad, mean
                cells = [_fmt_acc([r["top1"] for r in by[s]]) if by[s] else "-" for s in scores]
                lines.append(f"| {mode} | {keep} | {h} | " + " | ".join(cells) +
                             f" | {mad[0]:+.2f} ± {mad[1]:.2f} | {mean[0]:+.2f} ± {mean[1]:.2f} |")
    lines += ["", "## After fine-tuning with pruning on (keep 0.5, drop)", "",
              "| heads | unpruned control | var | mad | mean | mad - var | mean - var |", "|---|---|---|---|---|---|---|"]
    tuned: dict = {}
    recipes = set()
    for h, parts in models.items():
        if "b" not in parts:
            lines.append(f"| {h} | not run | | | | | |")
            continue
        recipes.add(parts["b"]["meta"].get("ft"))
        rows = [r for r in parts["b"]["rows"] if r["stat"] == "none" or (r["keep"] == 0.5 and r["mode"] == "drop")]
        acc = {s: [100 * r["top1"] for r in rows if r["stat"] == s] for s in ("none",) + STATS}
        cells = [_fmt_acc([v / 100 for v in acc[s]]) if acc[s] else "-" for s in ("none",) + STATS]
        for name in ("mad", "mean"):
            gap = _seed_gap(acc[name], acc["var"])
            if gap is not None:
                tuned[name, h] = gap
            cells.append(f"{gap[0]:+.2f} ± {gap[1]:.2f}" if gap else "-")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    recipe = "Fine-tuning: " + "; ".join(sorted(r for r in recipes if r)) + ". " if any(recipes) else ""
    lines += ["", recipe + "Differences after fine-tuning: difference of the seed means ± its standard error "
              "(needs two seeds of each).", "",
              "## Which patches are kept: share of object patches (keep 0.7, drop, no fine-tuning)", "",
              "| heads | score | " + " | ".join(f"after block {b}" for b in LAYERS) + " |",
              "|---|---|" + "---|" * len(LAYERS)]
    for h, parts in models.items():
        if "f" not in parts:
            continue
        for (stat,), g in _group([r for r in parts["f"]["rows"] if r["block"] is not None], ["stat"]).items():
            by = {r["block"]: r for r in g}
            lines.append(f"| {h} | {stat} | " + " | ".join(f"{100 * by[b]['object_share']:.1f}%" for b in LAYERS) + " |")
    commands = [c for parts in models.values() for p in parts.values() for c in p["meta"]["commands"]]
    lines += ["", "Evaluated with:", "", "```", *dict.fromkeys(commands), "```"]
    (res / "heads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_heads(gaps, tuned, sorted(models), res / "heads.png")


def plot_heads(gaps: dict, tuned: dict, heads: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), sharey=True)
    for ax, mode in zip(axes, MODES):
        for i, keep in enumerate(KEEP_RATES[1:]):
            hs = [h for h in heads if (mode, keep, h) in gaps]
            if not hs:
                continue
            for j, (name, style) in enumerate((("mad - var", "-"), ("mean - var", "--"))):
                gap = [gaps[mode, keep, h][j] for h in hs]  # (difference, 95% half-width) per head count
                ax.errorbar([h * (1 + 0.02 * (i - 1.5)) for h in hs], [g[0] for g in gap], yerr=[g[1] for g in gap],
                            color=f"C{i}", linestyle=style, marker="o" if j == 0 else "s", capsize=3,
                            label=f"{name}, keep {keep}")
        for name, style in (("mad", "-"), ("mean", "--")):
            hs = sorted(h for n, h in tuned if n == name)
            if mode == "drop" and hs:
                ax.errorbar(hs, [tuned[name, h][0] for h in hs], yerr=[tuned[name, h][1] for h in hs], color="k",
                            linestyle=style, marker="*" if name == "mad" else "P", markersize=11, capsize=3,
                            label=f"{name} - var after fine-tuning (keep 0.5, ± SE over seeds)")
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(heads, [str(h) for h in heads])
        ax.minorticks_off()
        ax.set_xlabel("heads")
        ax.set_title(f"mode = {mode}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 difference (points), 95% interval")
    fig.legend(*axes[1].get_legend_handles_labels(), fontsize=8, loc="lower center", ncol=3)
    tuned_legend = [(hd, lab) for hd, lab in zip(*axes[0].get_legend_handles_labels()) if "fine-tuning" in lab]
    if tuned_legend:
        axes[0].legend(*zip(*tuned_legend), fontsize=7, loc="lower left")
    fig.suptitle("Fashion-MNIST, pruning at blocks 3/6/9: MAD and mean scores against variance, by number of heads",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["a", "b", "c", "t", "f"])
    p.add_argument("--f-keep", type=float, default=0.7, help="part f: keep rate")
    p.add_argument("--t-batch", type=int, default=256, help="part t: batch size")
    p.add_argument("--t-rounds", type=int, default=5, help="part t: interleaved rounds (best kept)")
    p.add_argument("--t-iters", type=int, default=2, help="part t: batches per configuration per round")
    p.add_argument("--report", action="store_true")
    p.add_argument("--report-heads", action="store_true",
                   help="the var - MAD gap against the number of heads, from --heads-results")
    p.add_argument("--heads-results", default=str(HEADS_RESULTS),
                   help="folder with one subfolder of part results per model (default: %(default)s)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (parts b, c)")
    p.add_argument("--seed-list", default="", help="parts b, c: run only these seeds, e.g. 0,2 (a shard)")
    p.add_argument("--stat-list", default="",
                   help="parts a, b, c: run only these stats, e.g. none,var (a shard; part a: no 'none')")
    p.add_argument("--keep-list", default="", help="part a: run only these keep rates, e.g. 0.7,0.5")
    p.add_argument("--no-zero-epoch", action="store_true", help="part c: skip the evaluations before fine-tuning")
    p.add_argument("--c-runs", default="overlap,plain",
                   help="part c: which fine-tunings, comma list of 'overlap' (overlapping embedding, keep 0.5) "
                        "and 'plain' (plain embedding, keep 0.7: about as many token-blocks)")
    p.add_argument("--ft-epochs", type=float, default=2.0)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-warmup", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images only (0: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=str(RESULTS), help="folder of the parts' JSON (for --report)")
    p.add_argument("--out", default="", help="JSON output (default benchmarks/results/accuracy_<part>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        report(args)
        return 0
    if args.report_heads:
        report_heads(args)
        return 0
    if args.part is None:
        p.error("give --part a|b|c or --report")
    torch.manual_seed(0)
    model, ckpt = load_model(args.weights, device=args.device)
    config = ckpt["config"]
    test = datasets.load_fashion_mnist("test")
    if args.test_limit:
        test = (test[0][: args.test_limit], test[1][: args.test_limit])
    t0 = time.time()
    if args.part == "a":
        rows = part_a(model, config, test, args)
    elif args.part == "t":
        rows = part_t(model, config, test, args)
    elif args.part == "f":
        rows = part_f(model, config, test, args)
    else:
        train_data = datasets.load_fashion_mnist("train")
        fn = part_b if args.part == "b" else part_c
        rows = fn(args.weights, config, train_data, test, args)
    meta = {"weights": str(Path(args.weights).name), "params_sha256": params_digest(ckpt["state_dict"]),
            "model_meta": ckpt.get("meta", {}), "n_test": len(test[1]),
            "config": config, "parameters": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), "device": args.device, "torch": torch.__version__,
            "command": "python tools/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seconds": round(time.time() - t0), "ft": None if args.part == "a" else
            f"{args.ft_epochs} epoch(s) of the 60,000 training images, batch {args.batch_size}, AdamW lr {args.ft_lr} "
            f"(warm-up {args.ft_warmup} steps, cosine to {args.ft_lr / 100}), label smoothing 0.1, flips"}
    out = Path(args.out) if args.out else RESULTS / f"accuracy_{args.part}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out} in {meta['seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
