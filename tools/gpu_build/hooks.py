"""Counting hooks in Triton's CPU interpreter: every load, store and ``tl.dot`` a kernel executes.

The interpreter's builder (``triton.runtime.interpreter.InterpreterBuilder``) turns ``tl.load`` /
``tl.store`` into ``create_masked_load`` / ``create_masked_store`` and ``tl.dot`` into ``create_dot``;
:func:`hooked` wraps them and records the addresses each mask lets through and each dot's
``2 * M * N * K``. A GPU executes the same loads, stores and dots, so the counts are the GPU's.
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator

import numpy as np

__all__ = ["SUPPORTED_TRITON", "Counter", "check_interpreter", "check_interpreter_ok", "hooked"]

SUPPORTED_TRITON = ((3, 6), (3, 9))
_REQUIRED_HOOKS = ("create_masked_load", "create_masked_store", "create_dot")

def _triton_version() -> tuple[int, int]:
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return major, minor


def _builder_class():
    """``InterpreterBuilder``, after checking that it has the hook points this account wraps."""
    import triton

    try:
        from triton.runtime import interpreter
    except ImportError as e:  # pragma: no cover - depends on the installed triton
        raise RuntimeError(f"kernel account: triton {triton.__version__} has no triton.runtime.interpreter") from e
    cls = getattr(interpreter, "InterpreterBuilder", None)
    missing = [name for name in _REQUIRED_HOOKS if cls is None or not callable(getattr(cls, name, None))]
    if missing:
        raise RuntimeError(
            f"kernel account: triton {triton.__version__}'s interpreter has no InterpreterBuilder."
            f"{', '.join(missing)}; the account hooks were written for triton 3.6-3.9"
        )
    return cls


def check_interpreter() -> None:
    """Raise unless the Triton kernels are interpreted and the interpreter can be hooked."""
    from pruneattn.backend import interpreting

    if not interpreting():
        raise RuntimeError("kernel account: set TRITON_INTERPRET=1 before importing pruneattn's kernels")
    kernels = sys.modules.get("pruneattn.kernels.attention")
    if kernels is not None:
        fn = kernels._attention_fwd_kernel
        fn = getattr(fn, "fn", fn)  # the autotuner wraps the jitted function
        if type(fn).__name__ != "InterpretedFunction":
            raise RuntimeError(
                "kernel account: pruneattn's kernels were compiled, not interpreted "
                "(TRITON_INTERPRET=1 was set after they were imported)"
            )
    _builder_class()
    if not SUPPORTED_TRITON[0] <= _triton_version() <= SUPPORTED_TRITON[1]:
        import warnings

        warnings.warn(f"kernel account: untested triton version {_triton_version()} (tested 3.6-3.9)", stacklevel=2)


class _Accesses:
    """Addresses touched, grouped by element size, compacted to (unique address, count) pairs."""

    COMPACT_AT = 1 << 22

    def __init__(self) -> None:
        self.pending: dict[int, list[np.ndarray]] = {}
        self.pending_n = 0
        self.compact: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.bytes = 0

    def add(self, addrs: np.ndarray, elsize: int) -> None:
        if addrs.size == 0:
            return
        self.bytes += int(addrs.size) * elsize
        self.pending.setdefault(elsize, []).append(addrs.astype(np.uint64, copy=False).ravel())
        self.pending_n += addrs.size
        if self.pending_n >= self.COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        for elsize, arrays in self.pending.items():
            parts = [np.concatenate(arrays)]
            counts = [np.ones(parts[0].size, dtype=np.int64)]
            if elsize in self.compact:
                parts.insert(0, self.compact[elsize][0])
                counts.insert(0, self.compact[elsize][1])
            addrs, counts = np.concatenate(parts), np.concatenate(counts)
            order = np.argsort(addrs, kind="stable")
            addrs, counts = addrs[order], counts[order]
            uniq, start = np.unique(addrs, return_index=True)
            self.compact[elsize] = (uniq, np.add.reduceat(counts, start))
        self.pending, self.pending_n = {}, 0

    def groups(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        self._compact()
        return self.compact


class Counter:
    """Loads, stores and dot FLOPs seen by the hooked interpreter."""

    def __init__(self) -> None:
        self.loads = _Accesses()
        self.stores = _Accesses()
        self.dot_flops = 0
        self.calls = 0

    @staticmethod
    def _masked(ptrs, mask) -> tuple[np.ndarray, int]:
        data = np.asarray(ptrs.data)
        elty = ptrs.get_element_ty()
        elsize = max(1, int(elty.primitive_bitwidth) // 8)
        if mask is None:
            return data.ravel(), elsize
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape)
        return data[m], elsize

    def load(self, ptrs, mask) -> None:
        self.calls += 1
        self.loads.add(*self._masked(ptrs, mask))

    def store(self, ptrs, mask) -> None:
        self.calls += 1
        self.stores.add(*self._masked(ptrs, mask))

    def dot(self, a, b) -> None:
        a_shape, b_shape = np.shape(a.data), np.shape(b.data)
        batch = math.prod(a_shape[:-2]) if len(a_shape) > 2 else 1
        self.dot_flops += 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]



_active: list[Counter] = []


@contextlib.contextmanager
def hooked() -> Iterator[Counter]:
    """Count every load, store and dot the interpreter executes inside the ``with`` block."""
    check_interpreter()
    cls = _builder_class()
    counter = Counter()
    originals = {name: cls.__dict__[name] for name in (
        "create_masked_load", "create_masked_store", "create_dot", "create_load", "create_store",
        "create_atomic_rmw", "create_atomic_cas",
    ) if name in cls.__dict__}

    def masked_load(self, ptrs, mask, *args, **kwargs):
        for c in _active:
            c.load(ptrs, mask)
        return originals["create_masked_load"](self, ptrs, mask, *args, **kwargs)

    def masked_store(self, ptrs, value, mask, *args, **kwargs):
        for c in _active:
            c.store(ptrs, mask)
        return originals["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def dot(self, a, b, *args, **kwargs):
        for c in _active:
            c.dot(a, b)
        return originals["create_dot"](self, a, b, *args, **kwargs)

    def plain(name: str, kind: str):
        # tl.load / tl.store without a mask: in triton 3.6-3.9 these delegate to the masked
        # builders (counted there); count here only if a version stops delegating.
        orig = originals[name]

        def wrapper(self, ptr, *args, **kwargs):
            before = [c.calls for c in _active]
            out = orig(self, ptr, *args, **kwargs)
            for c, n in zip(_active, before):
                if c.calls == n:
                    (c.load if kind == "load" else c.store)(ptr, None)
            return out

        return wrapper

    def atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        for c in _active:
            c.load(ptr, mask)
            c.store(ptr, mask)
        return originals["create_atomic_rmw"](self, op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(self, ptr, *args, **kwargs):
        for c in _active:
            c.load(ptr, None)
            c.store(ptr, None)
        return originals["create_atomic_cas"](self, ptr, *args, **kwargs)

    wrappers = {"create_masked_load": masked_load, "create_masked_store": masked_store, "create_dot": dot}
    for name, kind in (("create_load", "load"), ("create_store", "store")):
        if name in originals:
            wrappers[name] = plain(name, kind)
    if "create_atomic_rmw" in originals:
        wrappers["create_atomic_rmw"] = atomic_rmw
    if "create_atomic_cas" in originals:
        wrappers["create_atomic_cas"] = atomic_cas
    first = not _active
    if first:
        for name, fn in wrappers.items():
            setattr(cls, name, fn)
    _active.append(counter)
    try:
        yield counter
    finally:
        _active.remove(counter)
        if first:
            for name, fn in originals.items():
                setattr(cls, name, fn)


def check_interpreter_ok() -> bool:
    try:
        check_interpreter()
    except RuntimeError:
        return False
    return True
