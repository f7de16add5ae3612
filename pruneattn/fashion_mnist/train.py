"""Train the small DeiT-style ViT on Fashion-MNIST (the model that ``pruneattn demo`` ships).

    python -m pruneattn.fashion_mnist.train --epochs 3 --out vit_fmnist.pt
    pruneattn demo --weights vit_fmnist.pt

The model is timm's ``VisionTransformer``: 12 blocks (so EViT's pruning blocks 3 / 6 / 9 exist), width
128, 4 heads of 32, MLP ratio 2, a class token, patch 7 on the 56 x 56 canvas view (8 x 8 = 64 patches).
Training: AdamW, linear warm-up then cosine decay, label smoothing 0.1, random horizontal flips, and a new
canvas position for every image in every epoch (the test set uses seed 0, fixed). Seeds are fixed; the
weights are saved in float16 with the config and the run's log.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pruneattn._progress import progress_bar
from pruneattn.fashion_mnist import datasets

DEFAULT_CONFIG = dict(
    img_size=56, patch_size=7, in_chans=1, num_classes=10, embed_dim=128, depth=12, num_heads=4, mlp_ratio=2.0,
    view="canvas", canvas=56,
)
DEFAULT_WEIGHTS = datasets.DATA_DIR / "vit_fmnist_canvas56.pt"
TEST_SEED = 0  # canvas positions of the test images
TRAIN_SEED_BASE = 1000  # epoch e of training places the images with seed TRAIN_SEED_BASE + e


def build_model(config: dict | None = None) -> torch.nn.Module:
    """A timm ``VisionTransformer`` with the given (default: :data:`DEFAULT_CONFIG`) architecture."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    return VisionTransformer(
        img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
        num_classes=cfg["num_classes"], embed_dim=cfg["embed_dim"], depth=cfg["depth"],
        num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
    )


def save_checkpoint(model: torch.nn.Module, config: dict, path: str | Path, meta: dict | None = None) -> None:
    """Float16 state dict + config + metadata."""
    state = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dict(config), "state_dict": state, "meta": dict(meta or {})}, path)


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, float32, on ``device``; checkpoint dict) from ``path`` (default: the shipped weights)."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path} (train them with `python -m pruneattn.fashion_mnist.train`)")
    from torch.torch_version import TorchVersion

    with torch.serialization.safe_globals([TorchVersion]):  # older checkpoints stored torch.__version__ as is
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(ckpt["config"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
    return model.to(device).eval(), ckpt


def view_of(images: np.ndarray, indices: np.ndarray, config: dict, seed: int) -> torch.Tensor:
    return datasets.make_view(images, indices, view=config.get("view", "canvas"), canvas=config.get("canvas", 56),
                              seed=seed)


def lr_at(step: int, total: int, lr: float, warmup: int, min_lr: float = 1e-5) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    config: dict,
    epochs: float = 1.0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 300,
    min_lr: float = 1e-5,
    label_smoothing: float = 0.1,
    flip: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log=None,
) -> dict:
    """Train in place for ``epochs`` (may be fractional) passes; returns {'steps', 'seconds', 'last_loss'}.

    Epoch ``e`` uses canvas seed ``TRAIN_SEED_BASE + e`` and a shuffle drawn from ``seed``.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    model.to(device).train()
    step, start, ema = 0, time.perf_counter(), None
    bar = progress_bar(total=total, enabled=progress, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
    epoch = 0
    while step < total:
        view = view_of(images, np.arange(n), config, TRAIN_SEED_BASE + epoch)
        for x, y in datasets.batches(view, labels_t, batch_size, shuffle=True, generator=gen):
            if step >= total:
                break
            if flip:
                mask = torch.rand(x.shape[0], generator=gen) < 0.5
                x = torch.where(mask[:, None, None, None], x.flip(-1), x)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr, warmup, min_lr)
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}", refresh=False)
            if log is not None and (step % 100 == 0 or step == total):
                log(f"step {step}/{total} epoch {epoch} loss(ema) {ema:.4f} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {time.perf_counter() - start:.0f}s")
        epoch += 1
    bar.close()
    model.eval()
    return {"steps": step, "seconds": time.perf_counter() - start, "last_loss": ema}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    config: dict,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Top-1 accuracy, which images were right (``correct``, bool per image) and images/s (model forward only,
    data preparation excluded) on the test view (canvas seed 0)."""
    model.eval()
    device = torch.device(device)
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    view = view_of(images, indices, config, TEST_SEED)
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    right, seconds, rates = [], 0.0, []
    for x, y in progress_bar(list(datasets.batches(view, labels_t, batch_size)), enabled=progress, desc=desc,
                     leave=False, dynamic_ncols=True):
        x = x.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pred = model(x).argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        seconds += dt
        if x.shape[0] == batch_size:
            rates.append(batch_size / dt)
        right.append((pred.cpu() == y).numpy())
    correct = np.concatenate(right) if right else np.zeros(0, dtype=bool)
    n = len(labels_t)
    # images/s over the whole pass, and the median over full batches (less sensitive to a busy machine).
    return {"top1": int(correct.sum()) / n, "correct": correct, "n": n, "images_per_s": n / seconds if seconds > 0 else float("nan"),
            "images_per_s_median": float(np.median(rates)) if rates else float("nan"), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pruneattn.fashion_mnist.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (0: all)")
    p.add_argument("--embed-dim", type=int, default=DEFAULT_CONFIG["embed_dim"],
                   help="model width (default: %(default)s)")
    p.add_argument("--heads", type=int, default=DEFAULT_CONFIG["num_heads"],
                   help="attention heads; must divide the width (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="vit_fmnist.pt",
                   help="where to save the weights (default: %(default)s; the model the package ships stays as it is)")
    p.add_argument("--log", default="", help="also append progress lines to this file")
    args = p.parse_args(argv)
    if args.heads < 1 or args.embed_dim < 1 or args.embed_dim % args.heads:
        p.error(f"--heads {args.heads} must be positive and divide --embed-dim {args.embed_dim}")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(msg + "\n")

    torch.manual_seed(args.seed)
    config = dict(DEFAULT_CONFIG, embed_dim=args.embed_dim, num_heads=args.heads)
    images, labels = datasets.load_fashion_mnist("train")
    if args.train_subset:
        images, labels = images[: args.train_subset], labels[: args.train_subset]
    test_images, test_labels = datasets.load_fashion_mnist("test")
    model = build_model(config)
    log(f"config {config}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"{len(images)} training images; torch threads {torch.get_num_threads()}")
    stats = train(model, images, labels, config=config, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed, device=args.device, log=log)
    log(f"trained {stats['steps']} steps in {stats['seconds']:.0f}s")
    # Evaluate the float16-rounded weights that are shipped, not the float32 ones.
    save_checkpoint(model, config, args.out)
    model16, _ = load_model(args.out, device=args.device)
    ev = evaluate(model16, test_images, test_labels, config=config, device=args.device, progress=True)
    log(f"test top-1 {ev['top1']:.4f} ({ev['n']} images, canvas seed {TEST_SEED}); {ev['images_per_s']:.0f} images/s")
    meta = {"command": "python -m pruneattn.fashion_mnist.train " + " ".join(argv if argv is not None else sys.argv[1:]),
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "steps": stats["steps"], "train_seconds": round(stats["seconds"], 1), "device": str(args.device),
            "test_top1": ev["top1"], "torch": str(torch.__version__)}
    save_checkpoint(model, config, args.out, meta=meta)
    log(f"saved {args.out} ({Path(args.out).stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
