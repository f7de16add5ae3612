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
H100 SXM from its public figures (3.35 TB/s, 989 TFLOP/s dense bf16; :mod:`pruneattn.bench.roofline`).
**The times are a model, not a measurement.** Counts are per image (batch 1 is run; every count is
linear in B, which ``tests/test_account.py`` checks) and scaled to batch 256 for the time bounds.

Attention runs in float16 in the interpreter (it has no bfloat16); bfloat16 moves the same bytes.

``python -m tools.gpu_build --account --out DIR`` writes ``account.json`` and ``account.md``. The
interpreter must be on before Triton defines the kernels, so the command re-runs itself in a
subprocess with ``TRITON_INTERPRET=1`` when needed.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pruneattn._progress import progress_bar
from pruneattn.bench.roofline import H100, attention_floor, h100_bound
from pruneattn.validate import QUERIES, STATS, num_kept
from tools.gpu_build.hooks import _Accesses, check_interpreter, hooked
from tools.gpu_build.traffic import eager_model, flash_model, select_floor

__all__ = [
    "BOUND_BATCH", "HEAD_DIM", "HS", "KEEP_RATE", "NS", "STANDARD_SHAPES", "KernelAccount", "Traffic",
    "account", "combine", "kernel_accounts", "run_account", "shape_account",
]

HEAD_DIM = 64
NS = (197, 325, 577, 785)
HS = (3, 6, 12, 16)
STANDARD_SHAPES = tuple((H, N) for N in NS for H in HS)
BOUND_BATCH = 256
KEEP_RATE = 0.7


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



def _tiles() -> tuple[int, int]:
    from pruneattn.kernels.attention import _attention_fwd_kernel

    cfg = _attention_fwd_kernel.configs[0].kwargs
    return int(cfg["BLOCK_M"]), int(cfg["BLOCK_N"])


def kernel_accounts(B: int, H: int, N: int, d: int = HEAD_DIM, dtype: torch.dtype = torch.float16, seed: int = 0) -> dict[str, KernelAccount]:
    """Every kernel, hooked, on random (never zero) inputs of one shape; separate q, k, v buffers."""
    check_interpreter()
    from pruneattn.kernels.attention import attention_fwd
    from pruneattn.kernels.class_row import class_row
    from pruneattn.kernels.column_mean import column_mean
    from pruneattn.kernels.gather import fuse_dropped, gather_kept
    from pruneattn.kernels.head_statistic import head_statistic
    from pruneattn.kernels.select import select_topk

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
    for query in QUERIES:
        runner = fwd(query == "cls")
        a = account(f"attention_fwd[{query}]", lambda r=runner, qq=query: fwd_out.setdefault(qq, r()), qkv)
        acc[a.name] = a
    lse = fwd_out["mean"]["lse"]
    cm: dict[str, torch.Tensor] = {}
    acc["column_mean"] = account(
        "column_mean", lambda: {"received": cm.setdefault("received", column_mean(q, k, lse, scale))}, {**qkv, "lse": lse}
    )
    for query, received, class_lse in (
        ("cls", fwd_out["cls"]["cls_logits"], fwd_out["cls"]["lse"][:, :, 0]),
        ("mean", cm["received"], None),
    ):
        for stat in STATS:
            ins = {"received": received, "lse": fwd_out[query]["lse"]}  # class_lse is a view of lse

            def run_stats(received=received, class_lse=class_lse, stat=stat):
                s, m = head_statistic(received, stat=stat, num_prefix=1, class_lse=class_lse)
                return {"scores": s, "head_mean": m}

            acc[f"head_statistic[{query},{stat}]"] = account(f"head_statistic[{query},{stat}]", run_stats, ins)
    row: dict[str, torch.Tensor] = {}

    def run_class_row():
        row["logits"], row["lse"] = class_row(q, k, scale)
        return dict(row)

    acc["class_row"] = account("class_row", run_class_row, {"q": q, "k": k})
    acc["head_statistic[sdpa-cls,var]"] = account(
        "head_statistic[sdpa-cls,var]",
        lambda: dict(zip(("scores", "head_mean"),
                         head_statistic(row["logits"], stat="var", num_prefix=1, class_lse=row["lse"]))),
        dict(row),
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
        "fused cls (var)": combine("fused cls (var)", [kernels["attention_fwd[cls]"], kernels["head_statistic[cls,var]"]]),
        "fused mean (var)": combine(
            "fused mean (var)", [kernels["attention_fwd[mean]"], kernels["column_mean"], kernels["head_statistic[mean,var]"]]
        ),
        "sdpa + class row (var)": combine("sdpa + class row (var)", [kernels["class_row"], kernels["head_statistic[sdpa-cls,var]"]]),
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
    eager = {q: eager_model(B, H, N, d, es, q) for q in QUERIES}
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



def run_account(shapes=STANDARD_SHAPES, B: int = 1, dtype: torch.dtype = torch.float16, progress: bool = True) -> dict:
    from pruneattn.bench.meta import environment
    from tools.gpu_build.nxn import nxn_check

    check_interpreter()
    it = progress_bar(shapes, enabled=progress, desc="kernel account", unit="shape")
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
