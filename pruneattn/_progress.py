"""Progress bars: tqdm's where it is installed, none where it is not (tqdm is optional)."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress_bar"]


class _NoBar:
    """The part of a tqdm bar that pruneattn uses (iteration, ``update``, ``set_postfix``, ``close``), silent."""

    def __init__(self, iterable: Iterable | None) -> None:
        self._iterable = () if iterable is None else iterable

    def __iter__(self) -> Iterator:
        return iter(self._iterable)

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(iterable, **kwargs)`` when ``enabled`` and tqdm is installed, else a silent stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:
            pass
        else:
            return tqdm(iterable, **kwargs)
    return _NoBar(iterable)
