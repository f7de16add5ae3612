"""Towers that merge units of tokens: the vision towers of Qwen2-VL, Qwen2.5-VL, Qwen3-VL (and -MoE),
Qwen3.5 (and -MoE) and GLM-4.1V / 4.5V / 4.6V.

The tower packs the patches of all its images (each frame of a video: one image) into one sequence;
every run of ``unit`` (2 x 2 = 4) consecutive tokens is one unit that its merger joins into one
language-model token (GLM's tower first downsamples each unit by a 2 x 2 strided convolution, which
reads those same 4 tokens). Qwen2.5-VL's tower reorders the units so that each window of patches is
contiguous, and most of its blocks attend within windows (``cu_window_seqlens``), a few over each
whole image (``cu_seqlens``); the other towers keep the units in raster order and attend over each
image in every block.

- Pruning runs only in full-attention blocks: q, k, v of the whole sequence at once, then each image's
  attention over its own tokens (no padding, no mask), its units scored (the statistic over heads of
  a unit's summed received attention, ``query="mean"``), and k = ceil(rate * units) whole units kept
  (``tokens=k``: at most k); the kept tokens stay packed, in their order. A ``score_hook`` is called
  once per image, with its (1, units) scores.
- Every block after a pruning block gets, in ``__call__`` (before transformers' activation
  checkpointing, so that a recompute sees the same), the boundaries rebuilt for the tokens that
  remain: its images' or its windows' kept tokens (a window whose tokens were all dropped is gone),
  and the rotary tables of the kept tokens.
- The merger merges the kept units; the tower's output puts them back in raster order per image, so
  ``pooler_output`` holds the kept units of each image in raster order, images one after the other;
  ``last_hidden_state`` holds the kept tokens in the tower's window order (GLM: the kept units,
  downsampled).
- DeepStack (Qwen3-VL): the extra mergers that the tower runs on the output of some blocks see the
  tokens that remain at that block (all of them before the first pruning block). Each of their outputs
  is put at its units' places among all units, like the merger's, and the tower's output keeps the rows
  of the kept units only, so every DeepStack feature has the rows of ``pooler_output``, in the same
  order (the tower's packed order, which is raster order for a tower without windows).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pruneattn.ops import select_tokens
from pruneattn.patch.prune import attention, check_traceable, selection_scores
from pruneattn.patch.registry import Family, attribute, blocks_of
from pruneattn.patch.positions import composed_kept
from pruneattn.patch.state import PackedTokens, Plan, begin, current, end
from pruneattn.patch.swap import Swapped, swap


def rebuilt_bounds(bounds: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Segment boundaries for the tokens at ``rows`` (ascending positions in the sequence that
    ``bounds`` (S + 1,) cuts into segments): each segment keeps its tokens among them; segments left
    empty are dropped. Returns the new boundaries (bounds' dtype) and the longest segment."""
    segment = torch.bucketize(rows, bounds[1:].to(rows.dtype), right=True)
    counts = torch.bincount(segment, minlength=bounds.numel() - 1)
    counts = counts[counts > 0]
    return F.pad(counts.cumsum(0), (1, 0)).to(bounds.dtype), int(counts.max())


class FollowsKeptUnits(Swapped):
    """Swapped into every block after the first pruning block: its boundaries (``cu_seqlens``, of its
    images or of its windows, as the tower passes them) and its rotary tables are rebuilt for the tokens
    that remain, once per pruning step and kind of boundary (the call's state keeps them)."""

    keeps_name = True
    _pruneattn_plan: Plan

    def __call__(self, hidden_states, *args, **kwargs):
        state = current(self._pruneattn_plan)
        packed = None if state is None else state.packed
        if packed is not None and packed.rows is not None and "cu_seqlens" in kwargs:
            bounds = kwargs["cu_seqlens"]
            # The images' and the windows' boundaries differ in count unless they are equal.
            key = bounds.numel()
            if key not in packed.rebuilt:
                new_bounds, longest = rebuilt_bounds(bounds, packed.rows)
                cos, sin = kwargs["position_embeddings"]
                packed.rebuilt[key] = (new_bounds, longest, (cos[packed.rows], sin[packed.rows]))
            new_bounds, longest, tables = packed.rebuilt[key]
            kwargs["cu_seqlens"], kwargs["position_embeddings"] = new_bounds, tables
            if kwargs.get("max_seqlen") is not None:
                kwargs["max_seqlen"] = longest
        return super().__call__(hidden_states, *args, **kwargs)


class PrunedWindowed(FollowsKeptUnits):
    """A pruning (full-attention) block of a tower that merges units: per image, whole units."""

    keeps_name = False

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
        check_traceable(hidden_states)
        cfg = self._pruneattn
        g, att, reader = cfg.unit, self.attn, cfg.reader
        bounds = cu_seqlens.tolist()  # one host read per pruning block
        T, C = hidden_states.shape
        # q, k, v of every token at once (per-token work), then attention and scores image by image:
        # no padding, no mask, each image's keys and queries only, as the unpatched block computes it.
        q, k, v = reader.heads(att, self.norm1(hidden_states)[None], position_embeddings)  # (1, H, T, d)
        out = q.new_empty((1, T, q.shape[1], q.shape[-1]))
        scores = []
        for a, b in zip(bounds, bounds[1:]):
            stats = attention(cfg, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], reader.scale(att))
            out[:, a:b] = stats.out.transpose(1, 2)
            scores.append(selection_scores(cfg, stats, 1, (b - a) // g))
        del q, k, v, stats
        x = hidden_states + reader.project(att, out.transpose(1, 2), hidden_states[None])[0]
        del out
        pieces, kept, rows = [], [], []
        for (a, b), score in zip(zip(bounds, bounds[1:]), scores):
            units = (b - a) // g
            if cfg.selects:
                n = cfg.kept(units)
                piece, idx = select_tokens(x[a:b].view(1, units, g * C), score, k=n, num_prefix=0)
                pieces.append(piece.view(-1, C))
                idx = idx[0]
            else:
                pieces.append(x[a:b])
                idx = torch.arange(units, device=x.device)
            kept.append(idx)
            rows.append((a + g * idx[:, None] + torch.arange(g, device=x.device)).flatten())
        x = torch.cat(pieces)
        state = current(cfg.plan)
        if state is not None and state.packed is not None:
            state.kept[cfg.layer] = torch.nn.utils.rnn.pad_sequence(kept, batch_first=True, padding_value=-1)
            packed, rows = state.packed, torch.cat(rows)
            packed.rows, packed.rebuilt = rows if packed.rows is None else packed.rows[rows], {}
        return x + self.mlp(self.norm2(x))


@dataclass(frozen=True)
class Windowed:
    """What the hooks of a patched window-attention tower need."""

    plan: Plan
    unit: int


def window_order(tower: nn.Module, grid_thw: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The tower's window index: for each unit in the packed (window) order, its raster index among all
    units (images one after the other). The one the caller passed precomputed, if any; the identity
    for a tower without windows."""
    if getattr(tower, "window_size", None) is None:
        return torch.arange(int((grid_thw.prod(-1) // tower.spatial_merge_size**2).sum()), device=grid_thw.device)
    given = kwargs.get("window_index")
    if given is not None:
        return given
    from transformers.vision_utils import get_vision_window_index

    index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    return index.to(grid_thw.device)


def _units_per_image(grid_thw: torch.Tensor, unit: int) -> list[int]:
    """Units of each image (each frame of a video is one), in packed order."""
    return [int(h) * int(w) // unit for t, h, w in grid_thw.tolist() for _ in range(int(t))]


def _begin(tower: nn.Module, args: tuple, kwargs: dict) -> None:
    """Open a call: the raster position of every unit of each image, in the order the blocks see them
    (``kept_indices`` index each image's raster grid of units)."""
    how: Windowed = tower._pruneattn_windowed
    state = begin(how.plan)
    grid = args[1] if len(args) > 1 else kwargs["grid_thw"]
    order = window_order(tower, grid, kwargs)
    sizes = _units_per_image(grid, how.unit)
    origin = torch.full((len(sizes), max(sizes)), -1, dtype=torch.int64, device=order.device)
    start = 0
    for i, n in enumerate(sizes):
        origin[i, :n] = order[start : start + n] - start
        start += n
    state.origin, state.sort_kept = origin, True
    state.packed = PackedTokens(order)


def _in_place(packed: PackedTokens, unit: int, rows: torch.Tensor) -> torch.Tensor:
    """Merged ``rows`` (one per remaining unit, packed order) at their units' places among all units
    (zeros elsewhere)."""
    full = rows.new_zeros((packed.window_index.numel(), rows.shape[-1]))
    return full.index_copy_(0, packed.rows[::unit] // unit, rows)


def _merged_in_place(merger: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of the merger: its rows (kept units, packed order) go back to their units' places
    among all units, so that the tower's own reordering to raster order holds."""
    how: Windowed = merger._pruneattn_windowed
    state = current(how.plan)
    if state is None or state.packed is None or state.packed.rows is None:
        return None
    return _in_place(state.packed, how.unit, output)


def _extra_in_place(merger: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of an extra (DeepStack) merger: its rows at their units' places among all units (as
    the merger's), recorded so that the call's end keeps the rows of the units kept by then."""
    how: Windowed = merger._pruneattn_windowed
    state = current(how.plan)
    if state is None or state.packed is None:
        return None
    packed = state.packed
    if packed.rows is not None:
        output = _in_place(packed, how.unit, output)
    packed.features.append(output)
    return output


def _end(tower: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
    """Close the call: ``pooler_output`` (and each DeepStack feature) keeps the merged rows of the kept
    units (raster order), and a dict output gains ``kept_units``: (images, k) int64, each image's kept
    units (raster indices into its grid of units, ascending, padded with -1), the same as
    ``kept_indices`` of this call's last pruning block, carried with the output so that its caller reads
    this call's own units."""
    how: Windowed = tower._pruneattn_windowed
    state = current(how.plan)
    if state is None:
        return None
    finished = False
    try:
        packed = state.packed
        if output is not None and packed is not None and packed.rows is not None:
            output = _keep_units(packed, how.unit, output)
            if not isinstance(output, tuple) and state.kept:
                output["kept_units"] = composed_kept(state)[max(state.kept)]
        finished = output is not None
    finally:
        end(state, finished)
    return output


def _keep_units(packed: PackedTokens, unit: int, output: object) -> object:
    """``output`` with the rows of its ``pooler_output`` (all units, raster order) and of its DeepStack
    features (all units, packed order) cut to the kept units."""
    order = packed.window_index
    units = packed.rows[::unit] // unit  # packed positions of the kept units
    kept = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
    kept[order[units]] = True
    present = torch.zeros_like(kept)
    present[units] = True
    recorded = packed.features
    found = not recorded

    def cut(value: object) -> object:
        nonlocal found
        if isinstance(value, list) and len(value) == len(recorded) and all(a is b for a, b in zip(value, recorded)):
            found = True
            return [feature[present] for feature in value]
        return value

    if isinstance(output, tuple):  # return_dict=False: (last_hidden_state, pooler_output, ...)
        output = (output[0], output[1][kept], *(cut(value) for value in output[2:]))
    else:
        output["pooler_output"] = output["pooler_output"][kept]
        for key, value in list(output.items()):
            output[key] = cut(value)
    if not found:
        raise RuntimeError(
            "pruneattn: the output of this tower does not hold its DeepStack features as the list its forward made, "
            "so the DeepStack features cannot be cut to the kept units; return the tower's own output unchanged"
        )
    return output


def attach(family: Family, tower: nn.Module, plan: Plan, unit: int) -> None:
    """Hook the tower's calls, its mergers and every block after the first pruning block."""
    how = Windowed(plan, unit)
    tower._pruneattn_plan = plan
    tower._pruneattn_windowed = how
    tower._pruneattn_hooks = (
        tower.register_forward_pre_hook(_begin, with_kwargs=True),
        tower.register_forward_hook(_end, with_kwargs=True, always_call=True),
    )
    extra = [] if family.deepstack is None else list(attribute(tower, family.deepstack))
    for merger, hook in ((attribute(tower, "merger"), _merged_in_place), *((m, _extra_in_place) for m in extra)):
        merger._pruneattn_plan, merger._pruneattn_windowed = plan, how
        merger._pruneattn_hooks = (merger.register_forward_hook(hook),)
    for i, block in enumerate(blocks_of(family, tower)):
        block._pruneattn_plan = plan
        if i > plan.layers[0] and i not in plan.layers:
            swap(block, FollowsKeptUnits)
