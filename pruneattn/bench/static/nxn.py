"""N x N detection: the shape of every tensor the torch ops on a path make, custom ops looked inside."""
from __future__ import annotations

import math

import torch

from pruneattn.bench.static.account import KEEP_RATE
from pruneattn.bench.static.hooks import check_interpreter_ok

__all__ = ["OpRecorder", "nxn_check"]

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


def nxn_check(B: int = 2, H: int = 3, N: int = 300, d: int = 64) -> dict:
    """Run the op path (attention + scores + selection) under :class:`OpRecorder` on the CPU path, the
    Triton path (interpreted) and the eager reference; report the N x N-sized outputs of each."""
    import pruneattn
    from pruneattn.dispatch import use_backend

    if N <= max(B * H, d, 64):
        raise ValueError("nxn_check needs N larger than B * H, d and the query chunk (else any dim >= N)")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, N, 3, H, d, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = torch.randn(B, N, H * d, generator=g)
    report = {}
    for backend in ("cpu", "triton", "reference"):
        for query in ("cls", "mean"):
            if backend == "triton" and not check_interpreter_ok():
                continue
            with use_backend(backend), OpRecorder() as rec:
                res = pruneattn.attention_stats(q, k, v, stat="var", query=query)
                pruneattn.select_tokens(x, res.scores, keep_rate=KEEP_RATE, mode="fuse", fuse_weights=res.head_mean)
            big = rec.largest()
            report[f"{backend}/{query}"] = {
                "ops": len(rec.records),
                "nxn_outputs": [f"{op} {list(s)}" for op, s in rec.square_outputs(N)],
                "largest_output": f"{big[0]} {list(big[1])}" if big else None,
                "largest_numel": math.prod(big[1]) if big else 0,
            }
    return {"shape": [B, H, N, d], "paths": report}
