"""Attention masks around patched blocks: which masks are padding masks, and the refusal of the others.

A patched block prunes under a *key padding mask* only: one bool per (image, token) saying whether the
token is real, the same for every query and every head. That is what a padded batch needs (images of
different sizes) and what Hugging Face's ViT-style encoders take as ``attention_mask``. Anything else
(a mask that differs between queries or heads, a bias that is not 0 / masked, a mask over a class,
distillation or register token) has no pruned equivalent, so it is refused before any work.
"""
from __future__ import annotations

import torch


def check_no_mask(args: tuple, kwargs: dict) -> None:
    """Refuse an attention mask (positional after the tokens, or by any of the libraries' names)."""
    masks = [a for a in args if a is not None and a is not False]
    masks += [kwargs[n] for n in ("attn_mask", "attention_mask") if kwargs.get(n) is not None]
    if masks or kwargs.get("is_causal", False):
        raise ValueError("pruneattn: patched blocks take no attention mask (attn_mask / attention_mask / is_causal)")


def key_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (B, 1, 1, N) additive key mask of a (B, N) padding mask: 0 at real keys, the dtype's lowest
    number at padded ones (what timm's and transformers' attention add to their logits), never N x N.
    :func:`padding_of` reads it back."""
    bias = torch.zeros((valid.shape[0], 1, 1, valid.shape[1]), dtype=dtype, device=valid.device)
    return bias.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)


def real_keys(mask: torch.Tensor) -> torch.Tensor:
    """True where a mask lets a key be seen: a bool mask as it is, a 0 / 1 mask (transformers' 2-D
    padding masks) where it is not 0, an additive mask where it adds 0."""
    if mask.dtype == torch.bool:
        return mask
    return mask != 0 if mask.dim() == 2 else mask == 0


def padding_of(args: tuple, kwargs: dict, batch: int) -> torch.Tensor | None:
    """The (B, N) padding mask behind the attention mask a layer is given (its first argument after the
    tokens, or ``attention_mask`` / ``attn_mask``): a (B, N) mask, or a broadcast key mask (B or 1, 1,
    1 or N, N), additive (0 at real keys) or boolean (True at real keys); None if there is none. Read
    from the first query row: a mask that reaches a layer was checked to be a key padding mask."""
    mask = args[0] if args else kwargs.get("attention_mask", kwargs.get("attn_mask"))
    if mask is None:
        return None
    if mask.dim() == 4:
        mask = mask[:, :1, :1, :]  # the first query row
    return real_keys(mask).reshape(mask.shape[0], -1).expand(batch, -1)


def caller_padding(mask: object, num_prefix: int, owner: str) -> torch.Tensor | None:
    """Check that the attention mask a caller passes to a patched ``owner`` (a class name) is a key
    padding mask over its tokens with every prefix token real: (B, N) with 0 at padding (transformers'
    form), or (B or 1, 1 or H, 1 or N, N), boolean (True: seen) or additive (0: seen; -inf or the
    dtype's lowest number: not seen), the same for every query and head. Raises ValueError otherwise;
    returns the (B or 1, N) bool mask of the real tokens (None for no mask)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"pruneattn: the attention_mask of a patched {owner} must be a tensor, got {type(mask).__name__}")
    if mask.dim() not in (2, 4):
        raise ValueError(
            f"pruneattn: a patched {owner} takes an attention_mask of shape (batch, tokens), 1 at real tokens and "
            f"0 at padding, or a (batch, 1, 1, tokens) key mask; got shape {tuple(mask.shape)}"
        )
    if mask.dim() == 4:
        if not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise ValueError(
                f"pruneattn: a 4-D attention_mask of a patched {owner} must be boolean (True: seen) or additive "
                f"floats (0: seen, -inf: not seen), got {mask.dtype}"
            )
        if mask.is_floating_point() and not ((mask == 0) | (mask <= torch.finfo(mask.dtype).min)).all():
            raise ValueError(
                f"pruneattn: the attention_mask of a patched {owner} adds values other than 0 and -inf (or the "
                "dtype's lowest number) to the attention logits: a bias, which pruning cannot take; pass a padding "
                "mask (1 at real tokens, 0 at padding)"
            )
        seen = real_keys(mask)
        if (seen != seen[:, :1, :1, :]).any():
            raise ValueError(
                f"pruneattn: the attention_mask of a patched {owner} differs between queries or heads; a patched "
                "model takes only a key padding mask (the same row for every query), shape (batch, tokens) or "
                "(batch, 1, 1, tokens)"
            )
        mask = seen[:, 0, 0, :]
    seen = real_keys(mask)
    if not bool(seen.any(dim=1).all()):
        raise ValueError(
            f"pruneattn: the attention_mask of a patched {owner} masks every token of an image; each image needs a "
            "real token"
        )
    if num_prefix and not bool(seen[:, :num_prefix].all()):
        raise ValueError(
            f"pruneattn: the attention_mask of a patched {owner} masks one of its first {num_prefix} tokens (class, "
            "distillation or register tokens), which are always kept; padding must be among the patch tokens "
            "(pad on the right)"
        )
    return seen


def mask_like(valid: torch.Tensor, given: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The padding mask ``valid`` (B, N) in the form of the mask a layer was ``given`` (None: an additive
    key mask of ``dtype``): a (B, N) mask of its dtype, a boolean view (B, 1, 1, N), or an additive
    (B, 1, 1, N) key mask (0 / lowest); never N x N."""
    if given is not None and given.dim() == 2:
        return valid.to(given.dtype)
    if given is not None and given.dtype == torch.bool:
        return valid[:, None, None, :]
    return key_mask(valid, dtype)
