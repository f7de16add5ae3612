"""Which patched models' calls are the model's own already in this context: inside ``generate`` (which
reads its call once, then runs the model on the model's call) and inside a forward that read its call
(the base model it calls, or a draft model that is the same model). Per thread and per task, as a
context variable (compile-safe), never on a shared module."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import Token

from pruneattn.patch.context import CallLocal

_READ: CallLocal[tuple[int, ...]] = CallLocal("pruneattn_vlm_read", default=())


def already_read(base: object) -> bool:
    """Whether calls of ``base``'s model are in the model's terms here."""
    return id(base) in _READ.get()


def enter(base: object) -> Token | tuple[str, object]:
    """From here on, calls of ``base``'s model are the model's own (until :func:`leave` with the token)."""
    return _READ.set(_READ.get() + (id(base),))


def leave(token: Token | tuple[str, object]) -> None:
    _READ.reset(token)


@contextlib.contextmanager
def model_terms(base: object) -> Iterator[None]:
    """Calls of ``base``'s model inside this block are the model's own."""
    token = enter(base)
    try:
        yield
    finally:
        leave(token)
