"""Argument checks shared by every path. Each raises before any work is done.

Ranks, shapes, dtypes, devices and options are always checked. Values are not: NaN and infinity
follow one rule on every path (docs/semantics.md, "Non-finite values"), so a CPU and a GPU run give
the same result. The one check of tensor *values*, non-negative fuse weights, reads a result back to
the host: it runs where that costs nothing (CPU tensors, outside ``torch.compile`` and
``torch.jit.trace``; see :func:`value_checks`).
"""
from __future__ import annotations

import math
import numbers

import torch

STATS = ("var", "mad", "mean")
QUERIES = ("cls", "mean")
MODES = ("drop", "fuse")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of the strings ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def value_checks(t: torch.Tensor) -> bool:
    """True where checking ``t``'s values needs no device sync and records nothing: CPU tensors,
    outside ``torch.compile`` and ``torch.jit.trace``."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def size(n: object) -> int:
    """A tensor size as a Python int (``torch.jit.trace`` hands sizes out as 0-dim tensors)."""
    return int(n)


def check_no_func_transform(t: torch.Tensor) -> None:
    """Refuse ``torch.func`` transforms (grad, vmap, jacrev) with the way that works: the ops' backward
    formulas are registered for ordinary autograd only. (torch has no public test for a transformed
    tensor; functorch's own predicate is the one place that knows.)"""
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t):
        raise RuntimeError(
            "pruneattn's ops do not support torch.func transforms (grad, vmap, jacrev, ...): use "
            "loss.backward() or torch.autograd.grad; torch.func.functional_call works"
        )


def check_num_prefix(num_prefix: object, num_tokens: int) -> None:
    num_tokens = size(num_tokens)
    if not _is_int(num_prefix) or not 0 <= num_prefix < num_tokens:
        raise ValueError(
            f"num_prefix must be an int in [0, N) with N = {num_tokens} tokens, got {num_prefix!r}"
        )


def check_valid(valid: object, shape: tuple[int, int], device: torch.device, num_prefix: int) -> None:
    """Validate a padding mask: a (B, N) bool tensor on ``device``, True at the real tokens.

    On CPU tensors (see :func:`value_checks`) its values are checked too: the prefix tokens must be
    real and every image must have at least one real token.
    """
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid must be a torch.Tensor (a (B, N) bool padding mask) or None, got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor (True at real tokens), got {valid.dtype}")
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"valid must have shape (B, N) = {tuple(shape)}, got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"valid must be on {device}, got {valid.device}")
    if value_checks(valid) and valid.numel():
        if num_prefix and not bool(valid[:, :num_prefix].all()):
            raise ValueError("valid must be True at the prefix tokens (class, register tokens are never padding)")
        if not bool(valid.any(dim=1).all()):
            raise ValueError("valid must mark at least one real token in every image")


def check_unit(unit: object, num_patches: int, valid: torch.Tensor | None, num_prefix: int) -> None:
    """Validate a selection unit: an int >= 1 that divides the patch count; under a padding mask each
    unit's patches are all real or all padding (checked on CPU tensors, see :func:`value_checks`)."""
    if not _is_int(unit) or unit < 1:
        raise ValueError(f"unit must be an int >= 1 (patches per selection unit), got {unit!r}")
    num_patches = size(num_patches)
    if num_patches % unit:
        raise ValueError(
            f"unit={unit} must divide the {num_patches} patches after the prefix (whole units of {unit} "
            "consecutive patches)"
        )
    if unit > 1 and valid is not None and value_checks(valid) and valid.numel():
        units = valid[:, num_prefix:].unflatten(1, (-1, unit))
        if not bool((units.all(dim=2) | ~units.any(dim=2)).all()):
            raise ValueError(f"valid must mark whole units of {unit} patches as real or as padding, not parts of one")


def check_attention_inputs(
    q: object,
    k: object,
    v: object,
    *,
    stat: str,
    query: str,
    num_prefix: int,
    scale: float | None,
    valid: object = None,
    unit: int = 1,
) -> None:
    """Validate the arguments of ``attention_scores``."""
    q, k, v = _tensor("q", q, 4), _tensor("k", k, 4), _tensor("v", v, 4)
    check_no_func_transform(q)
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k and v must have the same shape (B, H, N, d), got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if min(q.shape) < 1:
        raise ValueError(f"q, k and v must not be empty, got shape {tuple(q.shape)}")
    check_choice("stat", stat, STATS)
    check_choice("query", query, QUERIES)
    check_num_prefix(num_prefix, q.shape[2])
    if query == "cls" and num_prefix < 1:
        raise ValueError("query='cls' scores by the class token's row: num_prefix must be >= 1")
    check_valid(valid, (q.shape[0], q.shape[2]), q.device, num_prefix)
    check_unit(unit, q.shape[2] - num_prefix, valid, num_prefix)
    if isinstance(scale, torch.SymFloat) or (scale is not None and torch.compiler.is_compiling()):
        return  # torch.compile(dynamic=True) traces a module's float attribute as symbolic: no value to check
    if scale is not None and (
        not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def check_split_inputs(qkv: object, num_heads: object) -> None:
    """Validate the arguments of ``split_qkv``: a float (B, N, 3 * num_heads * d) tensor, num_heads >= 1."""
    if not _is_int(num_heads):
        raise TypeError(f"num_heads must be an int (the number of attention heads), got {num_heads!r}")
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    qkv = _tensor("qkv", qkv, 3)
    width = qkv.shape[-1]
    if width == 0 or width % (3 * num_heads):
        raise ValueError(
            f"qkv must be (B, N, 3 * num_heads * d): its last dim {width} is not divisible by "
            f"3 * num_heads = {3 * num_heads}; pass the module's own num_heads"
        )


def num_kept(num_patches: int, *, keep_rate: float | None = None, k: int | None = None) -> int:
    """Number of patches kept: ``k``, or ``ceil(keep_rate * num_patches)`` and at least 1.

    The product is rounded to 9 decimals before the ceiling so that ``0.7 * 10`` keeps 7, not 8.
    """
    if (keep_rate is None) == (k is None):
        raise ValueError("give exactly one of keep_rate and k")
    num_patches = size(num_patches)
    if k is not None:
        if not _is_int(k) or not 1 <= k <= num_patches:
            raise ValueError(f"k must be an int in [1, {num_patches}] (the patch count), got {k!r}")
        return int(k)
    check_keep_rate(keep_rate)
    return kept_of_rate(num_patches, keep_rate)


def kept_per_image(
    valid: torch.Tensor, num_prefix: int, *, keep_rate: float | None = None, k: int | None = None
) -> list[int]:
    """Patches kept per image under a padding mask ``valid`` (B, N): ``ceil(keep_rate * P_b)`` (at least
    1) or ``min(k, P_b)`` of each image's P_b real patches, 0 for an image without any. Reads the mask's
    row counts back to the host (one sync on a GPU): the output width is the largest of them."""
    counts = valid[:, num_prefix:].sum(dim=1).tolist()
    return [kept_count(c, keep_rate=keep_rate, k=k) for c in counts]


def kept_count(units: int, *, keep_rate: float | None = None, k: int | None = None) -> int:
    """How many of an image's ``units`` (patches, or merged tokens) one pruning step keeps: ``min(k,
    units)``, or ``ceil(keep_rate * units)`` and at least 1; 0 for an image without any. The one count
    that the blocks, the padded and packed encoders, the prompts of vision-language models and the
    processors that plan them all use (a fixed-size model refuses ``k`` above its patch count earlier)."""
    if not units:
        return 0
    return min(int(k), units) if k is not None else kept_of_rate(units, keep_rate)


def kept_of_rate(num_patches: int, keep_rate: float) -> int:
    """``ceil(keep_rate * num_patches)``, at least 1, for a keep rate already checked (no value check, so
    that it traces under ``torch.compile`` where the rate may be symbolic)."""
    return max(1, math.ceil(round(keep_rate * size(num_patches), 9)))


def check_keep_rate(keep_rate: object) -> None:
    """Raise TypeError unless ``keep_rate`` is a real number, ValueError unless it is in (0, 1]."""
    if not isinstance(keep_rate, numbers.Real) or isinstance(keep_rate, bool):
        raise TypeError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")
    if not math.isfinite(keep_rate) or not 0 < keep_rate <= 1:
        raise ValueError(f"keep_rate must be a number in (0, 1], got {keep_rate!r}")


def check_select_inputs(
    x: object,
    scores: object,
    *,
    keep_rate: float | None,
    k: int | None,
    num_prefix: int,
    mode: str,
    fuse_weights: object,
    valid: object = None,
) -> None:
    """Validate the arguments of ``select_tokens`` (and, on CPU tensors, non-negative fuse weights)."""
    x = _tensor("x", x, 3)
    check_no_func_transform(x)
    scores = _tensor("scores", scores, 2)
    check_num_prefix(num_prefix, x.shape[1])
    num_patches = x.shape[1] - num_prefix
    if scores.shape != (x.shape[0], num_patches):
        raise ValueError(
            f"scores must have shape (B, N - num_prefix) = {(x.shape[0], num_patches)}, "
            f"got {tuple(scores.shape)}"
        )
    if scores.device != x.device:
        raise ValueError(f"scores must be on x's device {x.device}, got {scores.device}")
    num_kept(num_patches, keep_rate=keep_rate, k=k)
    check_valid(valid, (x.shape[0], x.shape[1]), x.device, num_prefix)
    check_choice("mode", mode, MODES)
    if mode == "fuse":
        if fuse_weights is None:
            raise ValueError("mode='fuse' needs fuse_weights of shape (B, N - num_prefix)")
        fuse_weights = _tensor("fuse_weights", fuse_weights, 2)
        if fuse_weights.shape != scores.shape or fuse_weights.device != x.device:
            raise ValueError(
                f"fuse_weights must have shape {tuple(scores.shape)} on {x.device}, "
                f"got {tuple(fuse_weights.shape)} on {fuse_weights.device}"
            )
    elif fuse_weights is not None:
        raise ValueError("fuse_weights is only used with mode='fuse'")
    if mode == "fuse" and value_checks(fuse_weights) and bool((fuse_weights < 0).any()):
        raise ValueError(
            "fuse_weights must be non-negative (they are averaging weights, e.g. "
            "attention_stats(...).head_mean)"
        )
