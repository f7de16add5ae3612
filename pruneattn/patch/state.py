"""What a patched model is told to do (frozen) and what one call of it did (one object per call).

- :class:`BlockConfig` (frozen, on each pruning block as ``block._pruneattn``) and :class:`Plan`
  (frozen, one per ``pruneattn.patch`` call, shared by its blocks): the settings.
- :class:`ForwardState`: the kept indices (and, for grid-shaped features, the tokens before
  selection) of ONE forward call. The patched model's own forward (the module that opens the scope:
  a timm model's ``forward_features``, a Hugging Face encoder's ``forward``) creates it and makes it
  the current state of its thread and context while it runs; blocks write into the current state of
  their own plan only. Two threads, a forward run inside a hook of another forward, or an activation
  checkpoint's recompute (which runs outside any scope and so records nothing) cannot mix.
- :class:`LastForward`: where a finished call leaves its state for :func:`pruneattn.kept_indices`.
"""
from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pruneattn.validate import kept_count

ScoreHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Plan:
    """One ``pruneattn.patch`` call: its pruning blocks and where their last finished forward is kept."""

    layers: tuple[int, ...]
    last: LastForward = field(default_factory=lambda: LastForward(), repr=False)


@dataclass(frozen=True, eq=False)
class BlockConfig:
    """What one pruning block does."""

    layer: int  # index of the block in the model's block list
    keep_rate: float  # k = ceil(keep_rate * P), unless ``tokens`` is set
    stat: str
    query: str
    mode: str
    num_prefix: int  # class / distillation / register tokens, always kept
    fused_in: bool  # the block's input ends with a fused token made by an earlier block
    plan: Plan = field(repr=False)
    shape: Any = field(repr=False)  # pruneattn.patch.blocks.BlockShape: where selection sits
    reader: Any = field(repr=False)  # pruneattn.patch.blocks.AttentionReader: how q, k, v are taken
    score_hook: ScoreHook | None = field(default=None, repr=False)
    tokens: int | None = None  # keep exactly this many patches (instead of keep_rate)
    padded: bool = False  # the block's attention mask is a padding mask (images of different sizes)
    unit: int = 1  # patches per selection unit (merged tokens, scored and kept whole)

    @property
    def selects(self) -> bool:
        """Whether the block runs selection (False: keep rate 1.0, every token passes through unchanged)."""
        return self.tokens is not None or self.keep_rate < 1

    def kept(self, units: int) -> int:
        """Units this block keeps of an image's ``units``: ``tokens`` (at most that many), else ceil(keep_rate
        * units) (:func:`pruneattn.validate.kept_count`)."""
        return kept_count(units, keep_rate=self.keep_rate if self.tokens is None else None, k=self.tokens)


@dataclass(eq=False)
class ForwardState:
    """The pruning done by one forward call of one patched model."""

    plan: Plan
    record: bool = False  # keep each pruning block's tokens before selection (grid-shaped features)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, k) into that block's input patches
    before_selection: dict[int, torch.Tensor] = field(default_factory=dict)
    origin: torch.Tensor | None = None  # (B, L) grid positions of the tokens after patch dropout
    caller_mask: bool = False  # the caller passed an attention mask (Hugging Face encoders)
    valid: torch.Tensor | None = None  # (B, N) padding mask of the tokens between blocks (padded encoders)
    lengths: list[int] | None = None  # tokens of each image packed in one sequence (packed encoders)
    grids: list[tuple[int, int]] | None = None  # (rows, columns) of each image's patch grid (packed encoders)
    packed: PackedTokens | None = None  # where the remaining tokens sit (window-attention towers)
    sort_kept: bool = False  # kept_indices sorts each row (the blocks see the patches in another order)
    token: object = field(default=None, repr=False)  # restores the previous current state


@dataclass(eq=False)
class PackedTokens:
    """Where the tokens that remain sit in a window-attention tower's packed input sequence."""

    window_index: torch.Tensor  # (U,) raster index (among all units) of each unit, in packed order
    rows: torch.Tensor | None = None  # (T',) input positions of the remaining tokens; None: all remain
    rebuilt: dict = field(default_factory=dict)  # boundaries and rotary tables rebuilt for them, per kind
    features: list = field(default_factory=list)  # the extra (DeepStack) mergers' outputs, all units' places


class ForwardFailed:
    """Stands in :class:`LastForward` for a call that raised."""


class Exported:
    """Stands in :class:`LastForward` after ``torch.export`` traced the model (the exported program
    runs without Python, so it leaves no indices behind)."""


class LastForward:
    """The state of the last call that finished (or a marker); replaced whole, never mutated."""

    def __init__(self) -> None:
        self.state: ForwardState | ForwardFailed | Exported | None = None

    def __getstate__(self) -> dict:
        return {"state": None}  # a saved model carries no indices of a forward


_CURRENT: contextvars.ContextVar[ForwardState | None] = contextvars.ContextVar("pruneattn_forward", default=None)
# torch.compile cannot trace ContextVar.set; a compiled region is traced by one thread at a time and
# its Python side effects are replayed per call, so inside it the current state lives here instead.
_TRACED: list[ForwardState | None] = [None]


def current(plan: Plan) -> ForwardState | None:
    """The state of the forward call of ``plan``'s model that is running here, or None."""
    state = _TRACED[0] if torch.compiler.is_compiling() else _CURRENT.get()
    return state if state is not None and state.plan is plan else None


def begin(plan: Plan, record: bool = False) -> ForwardState:
    """Start a forward call's state and make it current until :func:`end`."""
    state = ForwardState(plan, record=record)
    if torch.compiler.is_compiling():
        state.token, _TRACED[0] = ("traced", _TRACED[0]), state
    else:
        state.token = _CURRENT.set(state)
    return state


def _exporting() -> bool:
    """True while ``torch.export`` traces the model. torch 2.11 also reports exporting inside
    ``torch.compile``'s Dynamo trace, which an export (non-strict, the default) does not run under."""
    return torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()


def end(state: ForwardState, finished: bool) -> None:
    """Make the previous state current again and leave ``state`` (or a failure marker) as the last call."""
    token = state.token
    if isinstance(token, tuple) and token[0] == "traced":
        _TRACED[0] = token[1]
    else:
        _CURRENT.reset(token)
    if _exporting():
        state.plan.last.state = Exported()
    else:
        state.plan.last.state = state if finished else ForwardFailed()


def scoped(plan: Plan, run: Callable[[ForwardState], object], record: bool = False) -> object:
    """``run(state)`` inside a new forward call's scope."""
    state = begin(plan, record)
    finished = False
    try:
        out = run(state)
        finished = True
        return out
    finally:
        end(state, finished)
