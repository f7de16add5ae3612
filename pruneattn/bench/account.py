"""Kernel account: the exact bytes every Triton kernel loads and stores, and its ``tl.dot`` FLOPs.

The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``) with counters hooked into the
interpreter's builder (``triton.runtime.interpreter.InterpreterBuilder``): every ``create_masked_load``
/ ``create_masked_store`` (what ``tl.load`` / ``tl.store`` become, tensor descriptors included)
records the addresses its mask lets through, and every ``create_dot`` its ``2 * M * N * K``. A GPU
executes the same loads, stores and dots, so the counts are the GPU's, exactly:

- bytes loaded / stored, all of them and at unique addresses (the compulsory traffic: what must
  cross DRAM at least once; repeats may hit in L2), split by buffer (Q, K, V, out, lse, ...);
- ``tl.dot`` FLOPs as executed, tile padding included.

Beside each kernel: its floor (Q, K, V read once; output, scores, indices, kept tokens written once),
the same account modelled for SDPA (flash: K and V re-read per query block, the per-row log-sum-exp
written) and for the eager path (the N x N matrix written and read back), and a lower-bound time on an
H100 SXM from its public figures (3.35 TB/s, 989 TFLOP/s dense bf16). **The times are a model, not a
measurement.** Counts are per image (batch 1 is run; every count is linear in B, which
``tests/test_account.py`` checks) and scaled to batch 256 for the time bounds.

Attention runs in float16 in the interpreter (it has no bfloat16); bfloat16 moves the same bytes.

``pruneattn bench --account --out DIR`` (or ``python benchmarks/account.py``) writes
``account.json`` and ``account.md``. The interpreter must be on before Triton defines the kernels,
so the command re-runs itself in a subprocess with ``TRITON_INTERPRET=1`` when needed.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

H100 = {
    "name": "H100 SXM (public spec figures)",
    "hbm_bytes_per_s": 3.35e12,
    "dense_bf16_flops_per_s": 989e12,
    "note": "model, not a measurement: max(bytes / bandwidth, FLOPs / peak)",
}
HEAD_DIM = 64
NS = (197, 325, 577, 785)
HS = (3, 6, 12, 16)
STANDARD_SHAPES = tuple((H, N) for N in NS for H in HS)
BOUND_BATCH = 256
KEEP_RATE = 0.7
SUPPORTED_TRITON = ((3, 6), (3, 9))
_REQUIRED_HOOKS = ("create_masked_load", "create_masked_store", "create_dot")


# ----------------------------------------------------------------------------- interpreter hooks


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
    from pruneattn._env import interpreting

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
_state = threading.local()


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


# ----------------------------------------------------------------------------- one kernel's account


@dataclass
class Traffic:
    loads: int = 0
    loads_unique: int = 0
    stores: int = 0
    stores_unique: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(*(a + b for a, b in zip(astuple_(self), astuple_(other))))


def astuple_(t: Traffic) -> tuple[int, int, int, int]:
    return (t.loads, t.loads_unique, t.stores, t.stores_unique)


@dataclass
class KernelAccount:
    """What one kernel launch (or a sequence of them) read, wrote and computed.

    ``total`` sums the kernels (a kernel's unique bytes are what that pass must move at least once);
    ``loads_unique_union`` / ``stores_unique_union`` count each address once over the whole sequence
    (the compulsory traffic if everything stayed in cache between kernels).
    """

    name: str
    total: Traffic
    by_buffer: dict[str, Traffic]
    dot_flops: int
    launches: list[str] = field(default_factory=list)
    loads_unique_union: int = 0
    stores_unique_union: int = 0
    addresses: dict = field(default_factory=dict, repr=False)  # kind -> {element size: unique addrs}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("addresses")
        return d


def _union_bytes(parts: list[dict[int, np.ndarray]]) -> tuple[int, dict[int, np.ndarray]]:
    merged: dict[int, np.ndarray] = {}
    for p in parts:
        for elsize, addrs in p.items():
            merged[elsize] = np.union1d(merged[elsize], addrs) if elsize in merged else addrs
    return sum(int(a.size) * es for es, a in merged.items()), merged


def _buffer_ranges(buffers: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    spans = []
    for name, t in buffers.items():
        if t is None or t.numel() == 0:
            continue
        start = t.data_ptr()
        last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        spans.append((start, start + (last + 1) * t.element_size(), name))
    spans.sort()
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(f"kernel account: buffers {n0} and {n1} overlap; pass separate allocations")
    starts = np.array([s for s, _, _ in spans], dtype=np.uint64)
    ends = np.array([e for _, e, _ in spans], dtype=np.uint64)
    return starts, ends, [n for _, _, n in spans]


def _classify(acc: _Accesses, starts, ends, names) -> dict[str, tuple[int, int]]:
    """{buffer: (bytes, unique bytes)}; addresses outside every named buffer go to "other"."""
    out: dict[str, list[int]] = {}
    for elsize, (addrs, counts) in acc.groups().items():
        idx = np.searchsorted(starts, addrs, side="right").astype(np.int64) - 1
        ok = idx >= 0
        ok[ok] = addrs[ok] < ends[idx[ok]]
        labels = np.where(ok, idx, len(names))
        total = np.bincount(labels, weights=counts, minlength=len(names) + 1) * elsize
        uniq = np.bincount(labels, minlength=len(names) + 1) * elsize
        for i, name in enumerate([*names, "other"]):
            if uniq[i]:
                slot = out.setdefault(name, [0, 0])
                slot[0] += int(round(total[i]))
                slot[1] += int(uniq[i])
    return {k: (v[0], v[1]) for k, v in out.items()}


def account(
    name: str, run: Callable[[], dict[str, torch.Tensor]], inputs: dict[str, torch.Tensor]
) -> KernelAccount:
    """Run ``run()`` (launches of pruneattn kernels) with the interpreter hooked.

    ``run`` returns its outputs by name; together with ``inputs`` they name the buffers that the
    traffic is attributed to (separate allocations, so address ranges identify them).
    """
    with hooked() as c:
        outputs = run()
    if c.calls == 0:
        raise RuntimeError(f"kernel account: no load or store was counted for {name}; are the hooks in use?")
    buffers = {**inputs, **outputs}
    starts, ends, names = _buffer_ranges(buffers)
    loads = _classify(c.loads, starts, ends, names)
    stores = _classify(c.stores, starts, ends, names)
    by_buffer: dict[str, Traffic] = {}
    for buf in sorted(set(loads) | set(stores)):
        lt, lu = loads.get(buf, (0, 0))
        st, su = stores.get(buf, (0, 0))
        by_buffer[buf] = Traffic(lt, lu, st, su)
    total = Traffic()
    for t in by_buffer.values():
        total = total + t
    if total.loads != c.loads.bytes or total.stores != c.stores.bytes:
        raise AssertionError("kernel account: classified bytes do not add up")  # pragma: no cover
    addresses = {
        "loads": {es: a for es, (a, _) in c.loads.groups().items()},
        "stores": {es: a for es, (a, _) in c.stores.groups().items()},
    }
    return KernelAccount(
        name, total, by_buffer, c.dot_flops, [name], total.loads_unique, total.stores_unique, addresses
    )


def combine(name: str, parts: list[KernelAccount]) -> KernelAccount:
    """The account of several kernels run in sequence (the buffers of all of them must still be alive)."""
    by_buffer: dict[str, Traffic] = {}
    total = Traffic()
    for p in parts:
        total = total + p.total
        for buf, t in p.by_buffer.items():
            by_buffer[buf] = by_buffer.get(buf, Traffic()) + t
    lu, la = _union_bytes([p.addresses["loads"] for p in parts])
    su, sa = _union_bytes([p.addresses["stores"] for p in parts])
    return KernelAccount(
        name, total, by_buffer, sum(p.dot_flops for p in parts), [n for p in parts for n in p.launches],
        lu, su, {"loads": la, "stores": sa},
    )


# ----------------------------------------------------------------------------- models and floors


def attention_floor(B: int, H: int, N: int, d: int, es: int, num_prefix: int = 1) -> dict:
    """Compulsory traffic of attention + scores: Q, K, V read once; output and scores written once."""
    qkv = 3 * B * H * N * d * es
    out = B * H * N * d * es
    scores = B * (N - num_prefix) * 4
    return {"loads": qkv, "stores": out + scores, "flops": 4 * B * H * N * N * d}


def select_floor(B: int, N: int, C: int, es: int, k: int, num_prefix: int = 1, fuse: bool = False) -> dict:
    """Selection + gather: scores read, the kept rows read and written once, indices written once."""
    P = N - num_prefix
    rows = num_prefix + k
    loads = B * P * 4 + B * rows * C * es
    stores = B * k * 8 + B * (rows + int(fuse)) * C * es
    if fuse:
        loads += B * (P - k) * C * es + B * P * 4  # the dropped rows and their weights
    return {"loads": loads, "stores": stores, "flops": 0}


def _pad(n: int, block: int) -> int:
    return -(-n // block) * block


def flash_model(B: int, H: int, N: int, d: int, es: int, block_m: int, block_n: int) -> dict:
    """SDPA's flash forward, modelled: per query block K and V are streamed once; writes out + lse."""
    q = k = v = out = B * H * N * d * es
    n_qblocks = -(-N // block_m)
    return {
        "loads": q + (k + v) * n_qblocks,
        "loads_unique": q + k + v,
        "stores": out + B * H * N * 4,
        "stores_unique": out + B * H * N * 4,
        "dot_flops": 4 * B * H * _pad(N, block_m) * _pad(N, block_n) * d,
        "flops_exact": 4 * B * H * N * N * d,
        "tiles": [block_m, block_n],
    }


def eager_model(B: int, H: int, N: int, d: int, es: int, query: str) -> dict:
    """The eager path (timm's non-fused Attention + a score on the weights), modelled op by op:
    q * scale; S = q @ k^T (N x N written); softmax (N x N read, N x N written); out = P @ V (N x N read);
    the score reads the class row of P (or all of P for query="mean")."""
    x = B * H * N * d * es
    nn_ = B * H * N * N * es
    loads = x + (x + x) + nn_ + (nn_ + x)
    stores = x + nn_ + nn_ + x
    loads += nn_ if query == "mean" else B * H * N * es
    return {"loads": loads, "stores": stores, "flops_exact": 4 * B * H * N * N * d, "nxn_bytes_written": 2 * nn_}


def h100_bound(bytes_moved: int, flops: int) -> dict:
    t_mem = bytes_moved / H100["hbm_bytes_per_s"]
    t_flop = flops / H100["dense_bf16_flops_per_s"]
    return {"seconds": max(t_mem, t_flop), "memory_s": t_mem, "compute_s": t_flop, "bound": "memory" if t_mem >= t_flop else "compute"}


# ----------------------------------------------------------------------------- the standard account


def _tiles() -> tuple[int, int]:
    from pruneattn.kernels.attention import _attention_fwd_kernel

    cfg = _attention_fwd_kernel.configs[0].kwargs
    return int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])


def kernel_accounts(B: int, H: int, N: int, d: int = HEAD_DIM, dtype: torch.dtype = torch.float16, seed: int = 0) -> dict[str, KernelAccount]:
    """Every kernel, hooked, on random (never zero) inputs of one shape; separate q, k, v buffers."""
    check_interpreter()
    from pruneattn.kernels.attention import attention_fwd
    from pruneattn.kernels.colsum import column_mean
    from pruneattn.kernels.gather import fuse_dropped, gather_kept
    from pruneattn.kernels.head_stats import head_stats
    from pruneattn.kernels.prefix_rows import class_rows
    from pruneattn.kernels.select import select_topk
    from pruneattn.validate import num_kept

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3))
    scale = d ** -0.5
    qkv = {"q": q, "k": k, "v": v}
    acc: dict[str, KernelAccount] = {}

    def fwd(store_cls: bool):
        def run():
            out, lse, cls = attention_fwd(q, k, v, scale, store_cls=store_cls)
            res = {"out": out, "lse": lse}
            if cls is not None:
                res["cls_logits"] = cls
            return res
        return run

    fwd_out: dict[str, dict] = {}
    for query in ("cls", "mean"):
        runner = fwd(query == "cls")
        a = account(f"attention_fwd[{query}]", lambda r=runner, qq=query: fwd_out.setdefault(qq, r()), qkv)
        acc[a.name] = a
    lse = fwd_out["mean"]["lse"]
    cm: dict[str, torch.Tensor] = {}
    acc["column_mean"] = account(
        "column_mean", lambda: {"received": cm.setdefault("received", column_mean(q, k, lse, scale))}, {**qkv, "lse": lse}
    )
    for query, received, row_stats in (
        ("cls", fwd_out["cls"]["cls_logits"], fwd_out["cls"]["lse"]),
        ("mean", cm["received"], lse),
    ):
        for stat in ("var", "mad", "mean"):
            ins = {"received": received, "lse": row_stats}

            def run_stats(received=received, row_stats=row_stats, stat=stat, query=query):
                s, m = head_stats(received, row_stats, num_prefix=1, stat=stat, is_cls=query == "cls")
                return {"scores": s, "head_mean": m}

            acc[f"head_stats[{query},{stat}]"] = account(f"head_stats[{query},{stat}]", run_stats, ins)
    rows_out: dict[str, torch.Tensor] = {}
    acc["class_rows"] = account("class_rows", lambda: {"rows": rows_out.setdefault("rows", class_rows(q, k, scale))}, {"q": q, "k": k})
    rows = rows_out["rows"]
    acc["head_stats[sdpa-cls,var]"] = account(
        "head_stats[sdpa-cls,var]",
        lambda: dict(zip(("scores", "head_mean"), head_stats(rows, rows, num_prefix=1, stat="var", is_cls=True))),
        {"rows": rows},
    )
    # Selection + gather on tokens x (B, N, C), C = H * d, scored by random float32 scores.
    C = H * d
    x = torch.randn(B, N, C, generator=g).to(dtype)
    scores = torch.rand(B, N - 1, generator=g)
    weights = torch.rand(B, N - 1, generator=g)
    kk = num_kept(N - 1, keep_rate=KEEP_RATE)
    sel: dict[str, torch.Tensor] = {}

    def run_select():
        idx, mask = select_topk(scores, kk)
        sel.update(kept_idx=idx, keep_mask=mask)
        return dict(sel)

    acc["select_topk"] = account("select_topk", run_select, {"scores": scores})
    acc["gather_kept"] = account("gather_kept", lambda: {"kept": gather_kept(x, sel["kept_idx"], 1)}, {"x": x, "kept_idx": sel["kept_idx"]})
    fused: dict[str, torch.Tensor] = {}

    def run_fuse():
        out = gather_kept(x, sel["kept_idx"], 1, extra_rows=1)
        fuse_dropped(x, weights, sel["keep_mask"], 1, out)
        fused["kept"] = out
        return {"kept": out}

    acc["gather_kept+fuse_dropped"] = account(
        "gather_kept+fuse_dropped", run_fuse, {"x": x, "kept_idx": sel["kept_idx"], "keep_mask": sel["keep_mask"], "weights": weights}
    )
    return acc


def shape_account(B: int, H: int, N: int, d: int = HEAD_DIM, dtype: torch.dtype = torch.float16) -> dict:
    """The kernels, the pipelines built from them, floors, models and H100 bounds for one shape."""
    es = torch.empty((), dtype=dtype).element_size()
    kernels = kernel_accounts(B, H, N, d, dtype)
    bm, bn = _tiles()
    flash = flash_model(B, H, N, d, es, bm, bn)
    P = N - 1
    k = math.ceil(round(KEEP_RATE * P, 9))
    pipelines = {
        "fused cls (var)": combine("fused cls (var)", [kernels["attention_fwd[cls]"], kernels["head_stats[cls,var]"]]),
        "fused mean (var)": combine(
            "fused mean (var)", [kernels["attention_fwd[mean]"], kernels["column_mean"], kernels["head_stats[mean,var]"]]
        ),
        "sdpa + class row (var)": combine("sdpa + class row (var)", [kernels["class_rows"], kernels["head_stats[sdpa-cls,var]"]]),
        "select + gather (drop)": combine("select + gather (drop)", [kernels["select_topk"], kernels["gather_kept"]]),
        "select + gather (fuse)": combine("select + gather (fuse)", [kernels["select_topk"], kernels["gather_kept+fuse_dropped"]]),
    }
    att_floor = attention_floor(B, H, N, d, es)
    floors = {
        "fused cls (var)": att_floor,
        "fused mean (var)": att_floor,
        "sdpa + class row (var)": att_floor,
        "select + gather (drop)": select_floor(B, N, H * d, es, k),
        "select + gather (fuse)": select_floor(B, N, H * d, es, k, fuse=True),
    }
    scale_to = BOUND_BATCH / B
    rows = {}
    for name, acc in pipelines.items():
        floor = floors[name]
        t = acc.total
        extra_sdpa = name.startswith("sdpa")
        loads_u = t.loads_unique + (flash["loads_unique"] if extra_sdpa else 0)
        stores_u = t.stores_unique + (flash["stores_unique"] if extra_sdpa else 0)
        flops = acc.dot_flops + (flash["dot_flops"] if extra_sdpa else 0)
        useful = floor["flops"]
        rows[name] = {
            "kernels": acc.launches + (["SDPA (modelled)"] if extra_sdpa else []),
            "measured": acc.to_dict(),
            "loads": t.loads + (flash["loads"] if extra_sdpa else 0),
            "loads_unique": loads_u,
            # SDPA reads all of Q, K, V: the class-row kernel's reads of q and k add nothing new.
            "loads_unique_union": acc.loads_unique_union
            + (flash["loads_unique"] - sum(acc.by_buffer[b].loads_unique for b in ("q", "k")) if extra_sdpa else 0),
            "stores_unique_union": acc.stores_unique_union + (flash["stores_unique"] if extra_sdpa else 0),
            "stores": t.stores + (flash["stores"] if extra_sdpa else 0),
            "stores_unique": stores_u,
            "dot_flops": flops,
            "floor": floor,
            "unique_over_floor": (loads_u + stores_u) / (floor["loads"] + floor["stores"]),
            "h100_bound_at_batch": BOUND_BATCH,
            "h100_bound_kernel": h100_bound(int((loads_u + stores_u) * scale_to), int(flops * scale_to)),
            "h100_bound_floor": h100_bound(int((floor["loads"] + floor["stores"]) * scale_to), int(useful * scale_to)),
        }
    sdpa_row = dict(flash)
    sdpa_row["h100_bound"] = h100_bound(int((flash["loads_unique"] + flash["stores_unique"]) * scale_to), int(flash["flops_exact"] * scale_to))
    eager = {q: eager_model(B, H, N, d, es, q) for q in ("cls", "mean")}
    for q, e in eager.items():
        e["h100_bound"] = h100_bound(int((e["loads"] + e["stores"]) * scale_to), int(e["flops_exact"] * scale_to))
    return {
        "B": B, "H": H, "N": N, "d": d, "dtype": str(dtype).replace("torch.", ""), "element_bytes": es,
        "keep": k, "tiles_interpreted": [bm, bn],
        "kernels": {n: a.to_dict() for n, a in kernels.items()},
        "pipelines": rows,
        "sdpa_flash_model": sdpa_row,
        "eager_model": eager,
    }


# ----------------------------------------------------------------------------- N x N detection


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


def check_interpreter_ok() -> bool:
    try:
        check_interpreter()
    except RuntimeError:
        return False
    return True


# ----------------------------------------------------------------------------- report


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Kernel account (exact counts from Triton's interpreter; times are a model)",
        "",
        f"- date {env['date']}, torch {env['torch']}, triton {env['triton']}, interpreter on {env['device']}",
        f"- counts per image (batch {result['batch']} run; counts are linear in B), d = {HEAD_DIM}, "
        f"{result['dtype']} in the interpreter (bfloat16 moves the same bytes); tiles pinned to the first "
        f"autotune config {result['shapes'][0]['tiles_interpreted']} (BLOCK_M, BLOCK_N)",
        f"- H100 bound: **model, not a measurement**: max(bytes / {H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"FLOPs / {H100['dense_bf16_flops_per_s'] / 1e12:.0f} TFLOP/s) at batch {BOUND_BATCH}, with the "
        "kernel's unique bytes (compulsory traffic) and its executed dot FLOPs; the floor's with exact FLOPs",
        "- loads / stores: all bytes the kernels move; unique: at distinct addresses (each byte once)",
        "",
        "| H | N | path | loads MB | unique loads MB | stores MB | unique stores MB | floor MB (ld+st) "
        "| dot GFLOP | / flash same tiles | extra f32 stored per (b,h,row) | H100 bound us (floor us) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for sh in result["shapes"]:
        B, H, N = sh["B"], sh["H"], sh["N"]
        flash = sh["sdpa_flash_model"]
        for name, r in sh["pipelines"].items():
            fl = r["floor"]
            ratio = f"{r['dot_flops'] / flash['dot_flops']:.3f}" if r["dot_flops"] else "-"
            extra = f"{(r['stores'] - fl['stores']) / (B * H * N * 4):.2f}" if "select" not in name else "-"
            lines.append(
                f"| {H} | {N} | {name} | {_mb(r['loads'] / B)} | {_mb(r['loads_unique'] / B)} | {_mb(r['stores'] / B)} "
                f"| {_mb(r['stores_unique'] / B)} | {_mb((fl['loads'] + fl['stores']) / B)} | {r['dot_flops'] / B / 1e9:.4f} "
                f"| {ratio} | {extra} | {r['h100_bound_kernel']['seconds'] * 1e6:.1f} ({r['h100_bound_floor']['seconds'] * 1e6:.1f}) |"
            )
        lines.append(
            f"| {H} | {N} | SDPA flash (model) | {_mb(flash['loads'] / B)} | {_mb(flash['loads_unique'] / B)} "
            f"| {_mb(flash['stores'] / B)} | {_mb(flash['stores_unique'] / B)} | - | {flash['dot_flops'] / B / 1e9:.4f} "
            f"| 1.000 | 1.00 (lse) | {flash['h100_bound']['seconds'] * 1e6:.1f} |"
        )
        for q, e in sh["eager_model"].items():
            lines.append(
                f"| {H} | {N} | eager {q} (model) | {_mb(e['loads'] / B)} | - | {_mb(e['stores'] / B)} | - | - "
                f"| {e['flops_exact'] / B / 1e9:.4f} (exact) | - | N x N written twice | {e['h100_bound']['seconds'] * 1e6:.1f} |"
            )
    nxn = result.get("nxn_check")
    if nxn:
        lines += ["", f"## N x N check (torch ops recorded on the op path, shape {nxn['shape']})", "",
                  "| path | ops | N x N-sized outputs | largest output |", "|---|---|---|---|"]
        for path, r in nxn["paths"].items():
            lines.append(f"| {path} | {r['ops']} | {len(r['nxn_outputs'])} | {r['largest_output']} |")
    lines.append("")
    return "\n".join(lines)


def run_account(shapes=STANDARD_SHAPES, B: int = 1, dtype: torch.dtype = torch.float16, progress: bool = True) -> dict:
    from pruneattn.bench.meta import environment

    check_interpreter()
    it = shapes
    if progress:
        from tqdm import tqdm

        it = tqdm(shapes, desc="kernel account", unit="shape")
    results = [shape_account(B, H, N, HEAD_DIM, dtype) for H, N in it]
    return {
        "kind": "kernel account",
        "environment": environment("cpu"),
        "batch": B,
        "dtype": str(dtype).replace("torch.", ""),
        "h100": H100,
        "shapes": results,
        "nxn_check": nxn_check(),
    }


def _reexec(argv: list[str]) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import sys; from pruneattn.bench.account import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.call([sys.executable, "-c", code, *argv], env=env)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pruneattn bench --account", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for account.json and account.md (printed only if omitted)")
    p.add_argument("--shapes", default=None, help="H:N pairs, comma-separated (default: the 16 standard shapes)")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    from pruneattn._env import interpreting

    if not interpreting() or ("pruneattn.kernels.attention" in sys.modules and not check_interpreter_ok()):
        return _reexec(list(argv or []))
    shapes = STANDARD_SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(x) for x in s.split(":")) for s in args.shapes.split(","))
    result = run_account(shapes, B=args.batch)
    md = markdown(result)
    print(md)
    if args.out:
        from pruneattn.bench.report import write_json

        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "account.json"), result)
        with open(os.path.join(args.out, "account.md"), "w", encoding="utf-8") as f:
            f.write(md)
        print(f"wrote {args.out}/account.json and account.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
