"""``pruneattn demo``: the shipped Fashion-MNIST ViT, unpruned vs pruned by attention diversity (var, MAD).

Loads the model shipped in ``pruneattn/fashion_mnist/data/`` (trained by
``python -m pruneattn.fashion_mnist.train``), evaluates it on the shipped sample of 64 test images and, when Debian's ``dataset-fashion-mnist`` is installed, on the full
test set (10,000 images), unpruned and with pruning after blocks 3 / 6 / 9 (var and MAD scores); prints
top-1 and images/s; and writes a PNG that shows which patches survive each pruning block.
Runs on the GPU (Triton kernels) when there is one, else on the CPU.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pruneattn._progress import progress_bar

# torch and numpy are imported where they are used, so that ``pruneattn demo --help`` answers at once.
if TYPE_CHECKING:
    import numpy as np
    import torch

LAYERS = (3, 6, 9)
DEFAULT_OUT = Path(tempfile.gettempdir()) / "pruneattn_demo" / "kept_patches.png"
# Where the printed training command writes its checkpoint: beside the picture, never over the shipped model.
TRAIN_OUT = DEFAULT_OUT.parent / "vit_fmnist_canvas56.pt"
# Dropped patches: a colour no grey pixel of the image has, hatched, so that they cannot pass for the image.
DROPPED_COLOR = (0.98, 0.55, 0.15)
HATCH_COLOR = (0.55, 0.22, 0.0)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(model, x: torch.Tensor, *, repeats: int = 5, min_seconds: float = 0.5) -> float:
    """Best-of-``repeats`` forward rate on batch ``x`` (after one warm-up), each repeat >= min_seconds."""
    import torch

    device = x.device
    best = 0.0
    with torch.no_grad():
        model(x)
        _sync(device)
        for _ in range(repeats):
            n, t0 = 0, time.perf_counter()
            while True:
                model(x)
                n += x.shape[0]
                _sync(device)
                dt = time.perf_counter() - t0
                if dt >= min_seconds:
                    break
            best = max(best, n / dt)
    return best


def predict(model, x: torch.Tensor, batch_size: int = 256, progress: bool = False, desc: str = "") -> torch.Tensor:
    """Predicted classes of ``x``, in batches."""
    import torch

    starts = progress_bar(range(0, len(x), batch_size), enabled=progress, desc=desc, leave=False, unit="batch")
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]).argmax(-1).cpu() for i in starts])


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def timing_note(rounds: int, load_start: float | None, load_end: float | None, cpus: int | None) -> str:
    """How the speeds were measured, and a warning when other work loaded the machine meanwhile."""
    how = ("one short round" if rounds == 1 else
           f"best of {rounds} rounds, the configurations taking turns so that a change of load hits all alike")
    if load_start is None or load_end is None or not cpus:
        return f"speed: {how}"
    note = f"speed: {how}; 1-minute load average {load_start:.2f} at start, {load_end:.2f} at end, on {cpus} CPUs"
    if max(load_start, load_end) > cpus + 0.5:
        note += (" (busy: more work than CPUs, so the speed-ups can be off, even below 1x; "
                 "run again on an idle machine)")
    return note


def kept_masks(model, x: torch.Tensor, grid: int) -> dict[int, np.ndarray]:
    """{block: (B, grid, grid) bool} of the patches that survive each pruning block, for images ``x``."""
    import torch

    import pruneattn

    with torch.no_grad():
        model(x)
    out = {}
    for block, idx in pruneattn.kept_indices(model).items():
        m = torch.zeros(idx.shape[0], grid * grid, dtype=torch.bool)
        m.scatter_(1, idx.cpu(), True)
        out[block] = m.view(-1, grid, grid).numpy()
    return out


def panel_title(stat: str, block: int, n_kept: int, pred: int | None, label: int) -> str:
    """Title of one panel: patches kept after ``block`` (class token not counted); with ``pred``, the prediction."""
    from pruneattn.fashion_mnist.datasets import CLASSES

    if pred is None:
        return f"{stat}: after block {block}\n{n_kept} patches kept"
    verdict = "right" if pred == label else "WRONG"
    return f"{stat}: block {block}, {n_kept} kept\npredicts {CLASSES[pred]}: {verdict}"


def panel_rgb(img: np.ndarray, keep_px: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1]: the grey image where ``keep_px`` is True, :data:`DROPPED_COLOR` elsewhere."""
    import numpy as np

    grey = np.repeat((img.astype(float) / 255.0)[..., None], 3, axis=-1)
    return np.where(keep_px[..., None], grey, np.asarray(DROPPED_COLOR, dtype=float))


def hatch_dropped(ax, kept: np.ndarray, patch: int) -> None:
    """Hatch every dropped patch (False in the (grid, grid) ``kept``) of one panel."""
    from matplotlib.patches import Rectangle

    for r, c in zip(*(~kept).nonzero()):
        ax.add_patch(Rectangle((c * patch - 0.5, r * patch - 0.5), patch, patch, fill=False, hatch="////",
                               edgecolor=HATCH_COLOR, linewidth=0))


def draw(images: np.ndarray, labels, preds: dict, masks: dict, patch: int, path: Path, keep: float) -> None:
    """Rows: images; columns: the input, then for each score the patches kept after blocks 3 / 6 / 9."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pruneattn.fashion_mnist.datasets import CLASSES

    stats = list(masks)
    blocks = sorted(next(iter(masks.values())))
    ncols = 1 + len(stats) * len(blocks)
    fig, axes = plt.subplots(len(images), ncols, figsize=(1.45 * ncols, 1.55 * len(images) + 0.5), squeeze=False)
    for r, img in enumerate(images):
        ax = axes[r, 0]
        ax.imshow(img, cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true: {CLASSES[labels[r]]}\nunpruned: {CLASSES[preds['unpruned'][r]]}", fontsize=6.5)
        for s, stat in enumerate(stats):
            for b, block in enumerate(blocks):
                ax = axes[r, 1 + s * len(blocks) + b]
                kept = masks[stat][block][r]
                ax.imshow(panel_rgb(img, np.kron(kept, np.ones((patch, patch), dtype=bool))))
                hatch_dropped(ax, kept, patch)
                for t in range(1, kept.shape[0]):  # patch grid
                    ax.axhline(t * patch - 0.5, color="w", lw=0.2, alpha=0.5)
                    ax.axvline(t * patch - 0.5, color="w", lw=0.2, alpha=0.5)
                last = b == len(blocks) - 1
                ax.set_title(panel_title(stat, block, int(masks[stat][block][r].sum()),
                                         int(preds[stat][r]) if last else None, int(labels[r])), fontsize=6.5)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"Patches kept (image shown) vs dropped (hatched orange) at keep rate {keep} per pruning block, "
                 f"by attention diversity across heads\n(patch counts exclude the class token, which is always "
                 f"kept: tokens = patches + 1; the last column of each score gives the pruned model's prediction)",
                 fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def training_command(meta: dict, out: Path = TRAIN_OUT) -> str:
    """The command that trained a checkpoint, as a user would run it now: today's module path, no log
    file, and the checkpoint written to ``out`` (never over the shipped model, the training's default)."""
    if "command" not in meta:
        return "?"
    words = ["pruneattn.fashion_mnist.train" if w == "pruneattn.train" else w for w in str(meta["command"]).split()]
    kept: list[str] = []
    skip = False
    for w in words:
        if skip:
            skip = False
        elif w in ("--log", "--out"):
            skip = True
        elif not w.startswith(("--log=", "--out=")):
            kept.append(w)
    return " ".join(kept + ["--out", str(out)])


def main(argv: list[str] | None = None) -> int:
    from pruneattn.cli import HelpFormatter

    p = argparse.ArgumentParser(prog="pruneattn demo", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--weights", default=None, help="checkpoint, e.g. one the training command writes (default: the shipped model)")
    p.add_argument("--keep", type=float, default=0.7, help="keep rate at each pruning block (0.7 is EViT's)")
    p.add_argument("--stats", default="var,mad", help="comma-separated scores to compare (var, mad, mean)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--full", choices=["auto", "yes", "no"], default="auto",
                   help="evaluate on the full test set: auto = when dataset-fashion-mnist is installed")
    p.add_argument("--quick", action="store_true", help="shipped sample only, short timing (for tests)")
    p.add_argument("--timing-seconds", type=float, default=None,
                   help="seconds per timing repeat (5 repeats, best kept; default: 0.5, with --quick one short repeat)")
    p.add_argument("--images", type=int, default=6, help="images in the picture")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="PNG of the kept patches to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    import pruneattn
    from pruneattn.fashion_mnist import datasets
    from pruneattn.fashion_mnist.train import TEST_SEED, load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stats = [s.strip() for s in args.stats.split(",") if s.strip()]
    model, ckpt = load_model(args.weights, device=device)
    cfg, meta = ckpt["config"], ckpt.get("meta", {})
    patch, grid = cfg["patch_size"], cfg["img_size"] // cfg["patch_size"]
    backend = pruneattn.backend_for(device)
    print(f"pruneattn demo: ViT ({cfg['depth']} blocks, width {cfg['embed_dim']}, {cfg['num_heads']} heads, "
          f"patch {patch} on a {cfg['img_size']}x{cfg['img_size']} canvas: {grid * grid} patches), "
          f"trained on Fashion-MNIST; device {device}, pruning backend {backend}"
          + ("" if device.type == "cuda" else f", {torch.get_num_threads()} CPU threads"))
    if args.weights is None:
        print(f"to train one like it: {training_command(meta)}; then: pruneattn demo --weights {TRAIN_OUT}")

    sample_imgs, sample_labels = datasets.load_sample()
    sets = [("shipped sample", sample_imgs, sample_labels)]
    want_full = args.full == "yes" or (args.full == "auto" and not args.quick)
    if want_full:
        try:
            full_imgs, full_labels = datasets.load_fashion_mnist("test")
            sets.append(("full test set", full_imgs, full_labels))
        except datasets.DatasetMissing as e:
            if args.full == "yes":
                raise
            print(f"(full test set not installed: `{datasets.INSTALL_HINT}` adds it; using the shipped sample only)")
            del e

    def view(imgs, indices=None):  # indices: the images' indices in the test set (set their canvas position)
        indices = np.arange(len(imgs)) if indices is None else indices
        return datasets.normalize(datasets.make_view(imgs, indices, view=cfg.get("view", "canvas"),
                                                     canvas=cfg.get("canvas", 56), seed=TEST_SEED)).to(device)

    configs = [("unpruned", None)] + [(f"{s} keep {args.keep}", s) for s in stats]
    bench_batch = 64 if args.quick else (1024 if device.type == "cuda" else 256)
    x_bench = view(np.resize(sample_imgs, (bench_batch, *sample_imgs.shape[1:])))
    def configure(stat):
        pruneattn.unpatch(model)
        if stat is not None:
            pruneattn.patch(model, keep_rate=args.keep, layers=LAYERS, stat=stat, query="cls", mode="drop")

    results = {}
    for name, stat in configs:
        configure(stat)
        row = {}
        for set_name, imgs, labels in sets:
            pred = predict(model, view(imgs), progress=len(imgs) > 1000 and not args.no_progress,
                           desc=f"{name}, {set_name}")
            row[set_name] = float((pred.numpy() == labels).mean())
        if stat is not None:
            with torch.no_grad():
                model(x_bench[:1])
            row["tokens"] = [int(t.shape[1]) + 1 for t in pruneattn.kept_indices(model).values()]
        results[name] = row
    # Timing: the configurations take turns, round after round, and each keeps its best round, so that a
    # change in the machine's load hits all of them alike.
    short = args.quick or args.timing_seconds == 0
    rounds = 1 if short else 5
    load_start = load_average()
    for _ in range(rounds):
        for name, stat in configs:
            configure(stat)
            rate = images_per_second(model, x_bench, repeats=1, min_seconds=0.0 if short else (args.timing_seconds or 0.5))
            results[name]["images/s"] = max(results[name].get("images/s", 0.0), rate)
    load_end = load_average()
    pruneattn.unpatch(model)

    width = max(len(n) for n in results) + 2
    head = "".join(f"{f'top-1 {s} ({len(l)})':>28}" for s, _, l in sets)
    print(f"\n{'':<{width}}{head}{f'images/s (batch {bench_batch})':>24}   tokens after blocks 3/6/9 (class token + patches)")
    base = results["unpruned"]["images/s"]
    for name, row in results.items():
        accs = "".join(f"{100 * row[s]:>27.2f}%" for s, _, _ in sets)
        speed = f"{row['images/s']:>12.0f} ({row['images/s'] / base:.2f}x)"
        toks = "/".join(map(str, row.get("tokens", [grid * grid + 1] * 3)))
        print(f"{name:<{width}}{accs}{speed:>24}   {toks}")
    print(timing_note(rounds, load_start, load_end, None if device.type == "cuda" else os.cpu_count()))

    # The picture: a few sample images of different classes.
    picks, seen = [], set()
    for i, lab in enumerate(sample_labels):
        if lab not in seen:
            picks.append(i)
            seen.add(lab)
        if len(picks) == args.images:
            break
    x = view(sample_imgs[picks], np.array(picks))
    masks, preds = {}, {}
    with torch.no_grad():
        preds["unpruned"] = model(x).argmax(-1).cpu().numpy()
    for stat in stats:
        pruneattn.patch(model, keep_rate=args.keep, layers=LAYERS, stat=stat, query="cls", mode="drop")
        masks[stat] = kept_masks(model, x, grid)
        with torch.no_grad():
            preds[stat] = model(x).argmax(-1).cpu().numpy()
        pruneattn.unpatch(model)
    canvas = datasets.make_view(sample_imgs[picks], np.array(picks), view=cfg.get("view", "canvas"),
                                canvas=cfg.get("canvas", 56), seed=TEST_SEED).numpy()
    out = Path(args.out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("\n(no picture: `pip install matplotlib` to get the PNG of the kept patches)")
        return 0
    draw(canvas, sample_labels[picks], preds, masks, patch, out, args.keep)
    print(f"\nwrote {out.resolve()}: which patches survive blocks {', '.join(map(str, LAYERS))} for {len(picks)} test images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
