"""The shape of every tensor the torch ops on a path make, pruneattn's custom ops looked inside.

The CPU op suite uses it to find the largest temporary of ``query="mean"`` and any N x N tensor.
"""
from __future__ import annotations

import math

import torch

__all__ = ["OpRecorder"]


class OpRecorder:
    """Records the shape of every tensor a torch op makes inside it, looking inside pruneattn's custom ops.

    A ``TorchDispatchMode`` sees a custom op as one opaque call; for ops in the ``pruneattn``
    namespace it re-enters itself and runs the op's Python implementation, so that every aten op on
    the path (SDPA, GEMMs, softmaxes, allocations of the Triton path's buffers) is seen.
    """

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self
        self.records: list[tuple[str, tuple[int, ...]]] = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if getattr(func, "namespace", None) == "pruneattn":
                    from torch._library.custom_ops import _maybe_get_opdef

                    opdef = _maybe_get_opdef(func)
                    if opdef is None:  # pragma: no cover - a pruneattn op not made by custom_op
                        raise RuntimeError(f"OpRecorder cannot look inside {func}")
                    with self:
                        return opdef._init_fn(*args, **kwargs)
                out = func(*args, **kwargs)
                # Views, in-place and out= ops return aliases of tensors recorded when they were made.
                if not any(r.alias_info is not None for r in func._schema.returns):
                    for t in torch.utils._pytree.tree_leaves(out):
                        if isinstance(t, torch.Tensor):
                            recorder.records.append((str(func), tuple(t.shape)))
                return out

        self._mode = _Mode()

    def __enter__(self) -> OpRecorder:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def square_outputs(self, N: int) -> list[tuple[str, tuple[int, ...]]]:
        """Ops whose output has two dimensions of at least N: an N x N (per batch and head) tensor."""
        return [(op, s) for op, s in self.records if sum(dim >= N for dim in s) >= 2]

    def largest(self) -> tuple[str, tuple[int, ...]] | None:
        return max(self.records, key=lambda r: math.prod(r[1]), default=None)
