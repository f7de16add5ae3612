"""Overlapping patch embedding for timm ViTs: more patches (kernel > stride), then pruned back.

``overlap_patches(model, stride=12, padding=2)`` turns DeiT-S's 16 x 16 / stride 16 embedding into
kernel 16 / stride 12 / padding 2: 224 x 224 -> 18 x 18 = 324 patches.

Weight rule (one rule, used for every conversion): the conv kernel keeps its weights. If a larger
``kernel_size`` is asked for, the old kernel sits centred in the new one and the border is zero, so
with ``padding = (new - old) / 2`` and the old stride the conversion computes exactly the old
embedding. Position embeddings are resized to the new grid by bicubic interpolation
(``timm.layers.resample_abs_pos_embed``); prefix-token entries are kept as they are.
"""
from __future__ import annotations

import numbers

import torch
from torch import nn


def _grid(size: tuple[int, int], kernel: tuple[int, int], stride: int, padding: int) -> tuple[int, int]:
    return tuple((s + 2 * padding - k) // stride + 1 for s, k in zip(size, kernel))


def _overlap_embed_class() -> type:
    """``OverlapPatchEmbed``: timm's ``PatchEmbed`` whose grid follows the conv's stride and padding.

    Built on first use (timm is imported only then) and published as ``pruneattn.overlap.OverlapPatchEmbed``
    so that converted models pickle.
    """
    cls = globals().get("OverlapPatchEmbed")
    if cls is not None:
        return cls
    from timm.layers import Format, PatchEmbed, to_2tuple
    from timm.layers.format import nchw_to

    class OverlapPatchEmbed(PatchEmbed):
        def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
            return _grid(img_size, self.proj.kernel_size, self.proj.stride[0], self.proj.padding[0])

        def feat_ratio(self, as_scalar: bool = True):
            s = self.proj.stride
            return max(s) if as_scalar else s

        def _init_img_size(self, img_size):
            """Image size, grid and patch count for ``img_size`` with this conv's stride and padding
            (``set_input_size`` asks this)."""
            if img_size is None:
                return None, None, None
            img_size = to_2tuple(img_size)
            grid = _grid(img_size, self.proj.kernel_size, self.proj.stride[0], self.proj.padding[0])
            if min(grid) < 1:
                raise ValueError(f"image size {img_size} leaves no patch for this overlapping embedding")
            return img_size, grid, grid[0] * grid[1]

        def set_input_size(self, img_size=None, patch_size=None):
            if patch_size is not None and to_2tuple(patch_size) != tuple(self.proj.kernel_size):
                raise ValueError(
                    "set_input_size: the patch size of an overlapping patch embedding cannot change; "
                    "change it before pruneattn.overlap_patches"
                )
            super().set_input_size(img_size=img_size)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.img_size is not None and self.strict_img_size and tuple(x.shape[-2:]) != tuple(self.img_size):
                raise ValueError(f"input size {tuple(x.shape[-2:])} does not match the model's {self.img_size}")
            x = self.proj(x)
            if self.flatten:
                x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC
            elif self.output_fmt != Format.NCHW:
                x = nchw_to(x, self.output_fmt)
            return self.norm(x)

    OverlapPatchEmbed.__module__ = __name__
    OverlapPatchEmbed.__qualname__ = "OverlapPatchEmbed"
    globals()["OverlapPatchEmbed"] = OverlapPatchEmbed
    return OverlapPatchEmbed


def __getattr__(name: str):
    if name == "OverlapPatchEmbed":
        return _overlap_embed_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_int(name: str, value: object, low: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def overlap_patches(
    model: nn.Module, stride: int = 12, padding: int = 2, kernel_size: int | None = None
) -> nn.Module:
    """Make a timm ViT's conv patch embedding overlapping (in place) and resize its position embedding.

    Args:
        model: a timm ``VisionTransformer`` (or subclass) with a plain conv ``PatchEmbed``.
        stride, padding: of the new conv; grid = (size + 2 * padding - kernel) // stride + 1.
        kernel_size: ``None`` keeps the kernel (and its weights); a larger square kernel gets the old
            weights centred and zeros around them (the difference must be even).

    Works on a patched model or before :func:`pruneattn.patch` (pruning counts the new patches).
    Returns ``model``.
    """
    try:
        from timm.layers import resample_abs_pos_embed
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is an optional dependency
        VisionTransformer = None
    if VisionTransformer is None or not isinstance(model, VisionTransformer):
        raise TypeError(f"overlap_patches supports timm VisionTransformer models, got {type(model).__name__}")
    from timm.layers import PatchEmbed

    OverlapPatchEmbed = _overlap_embed_class()
    embed = model.patch_embed
    if not isinstance(embed, PatchEmbed) or not isinstance(embed.proj, nn.Conv2d) or embed.img_size is None:
        raise TypeError(
            f"overlap_patches needs timm's conv PatchEmbed with a fixed img_size, got {type(embed).__name__}"
        )
    if embed.dynamic_img_pad:
        raise ValueError("overlap_patches does not support dynamic_img_pad=True")
    conv = embed.proj
    old_k = conv.kernel_size
    stride = _check_int("stride", stride, 1)
    padding = _check_int("padding", padding, 0)
    if kernel_size is None:
        new_k = old_k
    else:
        k = _check_int("kernel_size", kernel_size, 1)
        if any(k < o or (k - o) % 2 for o in old_k):
            raise ValueError(f"kernel_size must be >= the current kernel {old_k} by an even amount, got {k}")
        new_k = (k, k)
    if stride > min(new_k):
        raise ValueError(f"stride {stride} > kernel {new_k}: pixels would be skipped")
    if padding >= min(new_k):
        raise ValueError(
            f"padding {padding} >= kernel {new_k}: the border patches would cover only padding (zeros, "
            "no image content); use a padding smaller than the kernel, e.g. (kernel - stride) // 2"
        )
    old_grid = tuple(embed.grid_size)
    new_grid = _grid(embed.img_size, new_k, stride, padding)
    if min(new_grid) < 1:
        raise ValueError(f"kernel {new_k}, stride {stride}, padding {padding} leave no patch on {embed.img_size}")

    new_conv = nn.Conv2d(
        conv.in_channels, conv.out_channels, kernel_size=new_k, stride=stride, padding=padding,
        bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        top, left = (new_k[0] - old_k[0]) // 2, (new_k[1] - old_k[1]) // 2
        new_conv.weight.zero_()
        new_conv.weight[:, :, top : top + old_k[0], left : left + old_k[1]] = conv.weight
        if conv.bias is not None:
            new_conv.bias.copy_(conv.bias)
    new_conv.weight.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        new_conv.bias.requires_grad_(conv.bias.requires_grad)
    new_conv.train(conv.training)
    embed.proj = new_conv
    embed.__class__ = OverlapPatchEmbed
    embed.grid_size = new_grid
    embed.num_patches = new_grid[0] * new_grid[1]

    if model.pos_embed is not None:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        with torch.no_grad():
            pos = resample_abs_pos_embed(
                model.pos_embed.data, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix
            )
        model.pos_embed = nn.Parameter(pos.clone(), requires_grad=model.pos_embed.requires_grad)
    for info in getattr(model, "feature_info", None) or []:
        if isinstance(info, dict) and "reduction" in info:
            info["reduction"] = stride
    return model


__all__ = ["overlap_patches"]
