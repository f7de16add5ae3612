"""Block shapes and the pruning forward of each, written once per shape (not once per library class).

A block's shape is plain data naming its attributes, so that a new family is a registry entry:

- :class:`Sequential`: ``x = x + after1(attn(norm1(x)))``, select, ``x = x + after2(mlp(norm2(x)))``.
  Pre-norm blocks name ``norm1`` / ``norm2``; post-norm blocks (timm ``ResPostBlock``, ``EvaBlockPostNorm``)
  have none and put their norm in ``after``; layer scale (``ls1``, ``gamma_1``, DINOv2's ``layer_scale1``),
  drop path and dropout go in ``after`` too. Selection sits right after the attention residual.
- :class:`Parallel`: attention and MLP on the same input (timm ``ParallelScalingBlock`` /
  ``ParallelThingsBlock``); the whole block runs on all tokens, then selection on its output. Their
  forwards are timm's own structure and live in :mod:`pruneattn.patch.timm`.

How q, k, v are taken from an attention module (and its output projected) is an :class:`AttentionReader`
of the module's library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from pruneattn.patch.masks import check_no_mask, padding_of
from pruneattn.patch.prune import attention, check_traceable, prune_padded, prune_tokens
from pruneattn.patch.state import BlockConfig
from pruneattn.patch.swap import Swapped


class AttentionReader(Protocol):
    """q, k, v of an attention module as its forward makes them, and its output projection."""

    def heads(
        self, attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, H, N, d) for the tokens ``x`` (B, N, C)."""

    def scale(self, attn: nn.Module) -> float:
        """The logit scale."""

    def project(self, attn: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The module's output (B, N, C) from the attention output ``out`` (B, H, N, d) (laid out as
        (B, N, H, d) in memory) and its input ``x``."""

    def dropout(self, attn: nn.Module) -> float:
        """The probability of the dropout the module applies to its attention weights in train mode."""


@dataclass(frozen=True)
class Residual:
    """``x + after(module(norm(x)))`` with the block's attribute names; an ``after`` entry that is a
    module is applied, a tensor multiplies (timm ``gamma_1``), None is skipped."""

    module: str
    norm: str | None = None
    after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sequential:
    """A block that adds an attention branch, then an MLP branch, each on the previous sum."""

    block: str  # the block class's name
    attention: Residual
    mlp: Residual


@dataclass(frozen=True)
class Parallel:
    """A block whose attention and MLP read the same input (timm's parallel blocks)."""

    block: str


BlockShape = Sequential | Parallel


def part(block: nn.Module, name: str | None) -> object:
    return None if name is None else getattr(block, name)


def apply_after(block: nn.Module, names: tuple[str, ...], y: torch.Tensor) -> torch.Tensor:
    for name in names:
        f = getattr(block, name)
        if isinstance(f, torch.Tensor):
            y = y * f
        elif f is not None:
            y = f(y)
    return y


def attend(
    cfg: BlockConfig, reader: AttentionReader, attn: nn.Module, x: torch.Tensor, rope: torch.Tensor | None,
    valid: torch.Tensor | None = None,
):
    """The attention module's output for ``x`` computed by the scoring attention (with the module's
    attention dropout in train mode), and the stats (without the attention output, which must not outlive
    the projection: peak memory)."""
    dropout = reader.dropout(attn) if attn.training else 0.0
    stats = attention(cfg, *reader.heads(attn, x, rope), reader.scale(attn), valid, dropout)
    return reader.project(attn, stats.out, x), stats._replace(out=None)


class PrunedSequential(Swapped):
    """Swapped into a :class:`Sequential` block: prunes between its attention and its MLP branch."""

    _pruneattn: BlockConfig
    takes_padding = False  # its attention mask, if any, is a padding mask (otherwise a mask is refused)

    def forward(
        self, x: torch.Tensor, *args, rope: torch.Tensor | None = None, position_embeddings: tuple | None = None,
        **kwargs,
    ) -> torch.Tensor:
        check_traceable(x)
        cfg = self._pruneattn
        valid = None
        if cfg.padded or self.takes_padding:
            valid = padding_of(args, kwargs, x.shape[0])
            if valid is not None and valid.shape[1] != x.shape[1]:
                raise ValueError(
                    f"pruneattn: block {cfg.layer} was given a padding mask over {valid.shape[1]} tokens for its "
                    f"{x.shape[1]} tokens"
                )
        else:
            check_no_mask(args, kwargs)
        rope = position_embeddings if rope is None else rope  # timm's rotary table, or Hugging Face's (cos, sin)
        a, m = cfg.shape.attention, cfg.shape.mlp
        h = x if a.norm is None else part(self, a.norm)(x)
        y, stats = attend(cfg, cfg.reader, part(self, a.module), h, rope, valid)
        x = self._pruneattn_select(cfg, x + apply_after(self, a.after, y), stats, valid)
        h = x if m.norm is None else part(self, m.norm)(x)
        return x + apply_after(self, m.after, part(self, m.module)(h))

    def _pruneattn_select(self, cfg: BlockConfig, x: torch.Tensor, stats, valid: torch.Tensor | None) -> torch.Tensor:
        """The tokens the block keeps of ``x`` after its attention residual (``valid``: the padding mask of
        a padded encoder, or None); :mod:`pruneattn.patch.units` keeps whole units instead."""
        if valid is None:
            return prune_tokens(cfg, x, stats)
        return prune_padded(cfg, x, stats, valid)[0]
