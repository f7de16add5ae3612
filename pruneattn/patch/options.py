"""What a ``pruneattn.patch`` call asks for (:class:`Options`), and how much each pruning block keeps
(:class:`Amount`): settings, frozen, checked once.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from pruneattn.patch.state import ScoreHook
from pruneattn.validate import check_keep_rate, kept_count


@dataclass(frozen=True)
class Options:
    """The arguments of one ``pruneattn.patch`` call, as the caller gave them (checked against the model
    by :func:`pruneattn.patch.plan.plan_encoder`)."""

    keep_rate: float | Sequence[float] | None = None
    layers: int | Sequence[int] | None = None
    stat: str = "var"
    query: str | None = None
    mode: str = "drop"
    tokens: int | Sequence[int] | None = None
    score_hook: ScoreHook | None = None


@dataclass(frozen=True)
class Amount:
    """How much one pruning block keeps: ``tokens`` units if set, else ceil(keep_rate * units)."""

    keep_rate: float
    tokens: int | None = None

    @property
    def selects(self) -> bool:
        """Whether the block runs selection (keep rate 1.0 passes every token through)."""
        return self.tokens is not None or self.keep_rate < 1

    def kept(self, units: int) -> int:
        """Units kept of an image's ``units`` (``tokens``: at most that many; keep rate 1.0: all of them)."""
        return kept_count(units, keep_rate=self.keep_rate if self.tokens is None else None, k=self.tokens)


def is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def amounts(keep_rate: object, tokens: object, n: int) -> tuple[Amount, ...]:
    """One checked :class:`Amount` per pruning block from ``patch``'s ``keep_rate`` / ``tokens``."""
    if keep_rate is not None and tokens is not None:
        raise ValueError("give either keep_rate or tokens, not both")
    if tokens is None:
        rates = _per_layer("keep_rate", 0.7 if keep_rate is None else keep_rate, n)
        for r in rates:
            check_keep_rate(r)
        return tuple(Amount(float(r)) for r in rates)
    counts = _per_layer("tokens", tokens, n)
    for t in counts:
        if not is_int(t):
            raise TypeError(f"tokens must be an int (patches kept per image) or one per layer, got {t!r}")
        if t < 1:
            raise ValueError(f"tokens must be >= 1 (patches kept per image), got {t}")
    return tuple(Amount(1.0, int(t)) for t in counts)


def _per_layer(name: str, value: object, n: int) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} must be a number or one per layer ({n}), got {len(values)} values")
    return values


def kept_after(units: int, in_order: Sequence[Amount]) -> int:
    """Units of one image left after pruning blocks with these amounts (``tokens``: at most that many)."""
    for amount in in_order:
        units = amount.kept(units)
    return units


def check_fits(units: int, in_order: Sequence[Amount]) -> None:
    """Raise ValueError where ``tokens`` exceeds what a block of a fixed-size model receives."""
    for amount in in_order:
        if amount.tokens is not None and amount.tokens > units:
            raise ValueError(f"tokens={amount.tokens} is more than the {units} patches that pruning block receives")
        units = amount.kept(units)
