"""Fashion-MNIST, read straight from the idx files (gzip + numpy), in two views.

The files come from Debian's package ``dataset-fashion-mnist``
(``apt-get install -y dataset-fashion-mnist``), which puts the four ``*-idx?-ubyte.gz`` files under
``/usr/share/datasets/fashion-mnist``. ``PRUNEATTN_FASHION_MNIST`` (or ``root=``) points elsewhere.

Views:

- ``"plain"``: the 28 x 28 images.
- ``"canvas"``: the same image pasted at a pseudo-random position on a larger black canvas
  (56 x 56 by default), so that most patches are background: the situation pruning is for. The
  position is a hash of (image index, seed), so it is deterministic per image and does not depend on
  which slice of the data set is loaded.

A small sample of the test set (the first ``SAMPLE_SIZE`` images) ships inside the package as
``pruneattn/fashion_mnist/data/fashion_mnist_sample.npz`` so that the demo and the tests run without the package.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean / std of the plain 28 x 28 training images (pixel values in [0, 1]); the canvas view uses the same
# normalization so that one model definition serves both.
MEAN, STD = 0.2860, 0.3530
DATA_DIR = Path(__file__).with_name("data")
SAMPLE_PATH = DATA_DIR / "fashion_mnist_sample.npz"
SAMPLE_SIZE = 64

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
               0x0E: np.dtype(">f8")}


class DatasetMissing(FileNotFoundError):
    """The Fashion-MNIST idx files are not installed."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (optionally gzip-compressed): magic ``0 0 dtype ndim``, ``ndim`` big-endian sizes, data."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown idx type code 0x{code:02x}")
    dtype = np.dtype(_IDX_DTYPES[code])
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(f"{path}: size {len(raw)} does not match header shape {shape} of {dtype}")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get("PRUNEATTN_FASHION_MNIST") or DEFAULT_ROOT)


def available(root: str | os.PathLike | None = None) -> bool:
    """Whether all four idx files are present."""
    r = data_root(root)
    return all((r / name).is_file() for pair in FILES.values() for name in pair)


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the ``"train"`` (60,000) or ``"test"`` (10,000) split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    r = data_root(root)
    paths = [r / name for name in FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetMissing(
            f"Fashion-MNIST idx files not found: {', '.join(missing)}. Install them with\n"
            f"    {INSTALL_HINT}\n"
            f"(or set PRUNEATTN_FASHION_MNIST to a folder holding the four *-ubyte.gz files)."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"unexpected idx shapes: images {images.shape}, labels {labels.shape}")
    return images, labels.astype(np.int64)


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """The shipped sample: the first ``SAMPLE_SIZE`` test images (uint8 (n, 28, 28)) and labels (int64)."""
    with np.load(SAMPLE_PATH) as z:
        return z["images"].copy(), z["labels"].astype(np.int64)


def _hash(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a well-mixed uint64 hash of each element."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def canvas_offsets(indices: np.ndarray, canvas: int = 56, size: int = 28, seed: int = 0) -> np.ndarray:
    """(n, 2) top-left (row, col) of each image on the canvas, a deterministic function of (index, seed)."""
    span = canvas - size + 1
    if span < 1:
        raise ValueError(f"canvas {canvas} is smaller than the image {size}")
    idx = np.asarray(indices, dtype=np.uint64)
    h = _hash(idx * np.uint64(2) + _hash(np.full_like(idx, seed, dtype=np.uint64)))
    rows = (h % np.uint64(span)).astype(np.int64)
    cols = ((h >> np.uint64(32)) % np.uint64(span)).astype(np.int64)
    return np.stack([rows, cols], axis=1)


def to_canvas(images: np.ndarray | torch.Tensor, indices: np.ndarray, canvas: int = 56, seed: int = 0) -> torch.Tensor:
    """Paste (n, s, s) uint8 images onto (n, canvas, canvas) zeros at :func:`canvas_offsets`."""
    imgs = torch.as_tensor(np.asarray(images))
    n, size = imgs.shape[0], imgs.shape[-1]
    offs = torch.from_numpy(canvas_offsets(indices, canvas, size, seed))
    out = torch.zeros(n, canvas, canvas, dtype=imgs.dtype)
    # Gather-free paste: a (n, size) row / column index per image, then one advanced-index assignment.
    ar = torch.arange(size)
    rows = (offs[:, 0:1] + ar)[:, :, None].expand(n, size, size)
    cols = (offs[:, 1:2] + ar)[:, None, :].expand(n, size, size)
    out[torch.arange(n)[:, None, None], rows, cols] = imgs
    return out


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (n, h, w) -> float32 (n, 1, h, w), standardized with the training set's mean and std."""
    return ((images_uint8.float() / 255.0 - MEAN) / STD).unsqueeze(1)


def make_view(images: np.ndarray, indices: np.ndarray | None = None, view: str = "canvas", canvas: int = 56,
              seed: int = 0) -> torch.Tensor:
    """uint8 (n, h, w) tensor of the chosen view; ``indices`` are the images' indices in their split."""
    if view == "plain":
        return torch.as_tensor(np.asarray(images)).clone()
    if view == "canvas":
        if indices is None:
            indices = np.arange(len(images))
        return to_canvas(images, indices, canvas, seed)
    raise ValueError(f"view must be 'plain' or 'canvas', got {view!r}")


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None):
    """Yield (normalized float images (b, 1, h, w), labels (b,)) batches from uint8 images."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        sel = order[start : start + batch_size]
        yield normalize(images[sel]), labels[sel]
