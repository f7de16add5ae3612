"""A value per forward call's context (thread and task) that ``torch.compile`` can trace.

A ``ContextVar`` keeps per-call values apart across threads, tasks and nested calls, but Dynamo cannot
trace ``ContextVar.set``. A compiled region is traced by one thread at a time and its Python side effects
are replayed per call, so while compiling, a value set inside the region lives in a plain cell instead
(reads there see it, else the context's value)."""
from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Generic, TypeVar

import torch

T = TypeVar("T")
_UNSET = object()


class CallLocal(Generic[T]):
    """``get`` / ``set`` / ``reset`` as a ``ContextVar``'s, compile-safe (see the module docstring)."""

    def __init__(self, name: str, default: T) -> None:
        self._var: ContextVar[T] = ContextVar(name, default=default)
        self._traced: list[object] = [_UNSET]

    def get(self) -> T:
        if torch.compiler.is_compiling() and self._traced[0] is not _UNSET:
            return self._traced[0]  # type: ignore[return-value]
        return self._var.get()

    def set(self, value: T) -> Token | tuple[str, object]:
        """Sets ``value``; returns the token that :meth:`reset` takes to restore the value before."""
        if torch.compiler.is_compiling():
            token = ("traced", self._traced[0])
            self._traced[0] = value
            return token
        return self._var.set(value)

    def reset(self, token: Token | tuple[str, object]) -> None:
        if isinstance(token, tuple):
            self._traced[0] = token[1]
        else:
            self._var.reset(token)
