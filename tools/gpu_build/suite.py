"""The GPU build suite: record the launches, compile them for each arch, join the kernel account.

The launches and the account need Triton's interpreter; the compilation needs the kernels compiled,
not interpreted. :func:`in_interpreter` runs a function of this module in-process when the
interpreter is on, else in a subprocess with ``TRITON_INTERPRET=1``; the compilation always runs in
fresh processes without it (:func:`tools.gpu_build.build.build_in_subprocess`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import torch

from pruneattn._progress import progress_bar
from tools.gpu_build.arch import ARCHS
from tools.gpu_build.build import Job, build_in_subprocess, toolchain
from tools.gpu_build.child import child_env
from tools.gpu_build.launches import Launch, sweep, with_bfloat16

__all__ = ["HEAD_DIMS", "SHAPES", "in_interpreter", "record", "run_build"]

HEAD_DIMS = (16, 24, 40, 64, 72, 80, 96, 128, 256)
SHAPES = ((3, 197), (6, 197), (12, 197), (3, 577), (6, 577), (12, 577))
ARCH_NAMES = ("sm_80", "sm_90", "sm_100")
DTYPES = ("float16", "float32")
SHAPE_HEAD_DIM = 64
SHAPE_ARCH = "sm_90"


def in_interpreter(func: str, **kwargs) -> object:
    """``func(**kwargs)`` (a function of this module, JSON in and out) under Triton's interpreter."""
    from pruneattn.backend import interpreting
    from tools.gpu_build.hooks import check_interpreter_ok

    if interpreting() and check_interpreter_ok():
        return globals()[func](**kwargs)
    env = child_env(interpret=True)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        code = ("import json, sys; from tools.gpu_build import suite; "
                "json.dump(getattr(suite, sys.argv[1])(**json.loads(sys.argv[2])), open(sys.argv[3], 'w'))")
        subprocess.run([sys.executable, "-c", code, func, json.dumps(kwargs), out], env=env, check=True)
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def recorded(dtypes, head_dims, shapes, progress: bool = False) -> list[dict]:
    """The launches of :func:`~tools.gpu_build.launches.sweep`, as dicts (interpreter on)."""
    launches = sweep(tuple(getattr(torch, d) for d in dtypes), tuple(head_dims),
                     tuple(tuple(s) for s in shapes), progress=progress)
    return [launch.to_dict() for launch in launches]


def record(dtypes=DTYPES, head_dims=(64,), shapes=((3, 197),), progress: bool = False) -> list[Launch]:
    """Every launch the public ops make over the sweep, plus their bfloat16 copies."""
    rows = in_interpreter("recorded", dtypes=list(dtypes), head_dims=list(head_dims),
                          shapes=[list(s) for s in shapes], progress=progress)
    return with_bfloat16([Launch.from_dict(r) for r in rows])


def accounted(shapes, head_dim: int = SHAPE_HEAD_DIM, progress: bool = False) -> list[dict]:
    """The kernel account's H100 bounds per shape (interpreter on; float16 counts, batch 1 run)."""
    from tools.gpu_build.account import BOUND_BATCH, shape_account

    it = progress_bar(shapes, enabled=progress, desc="kernel account", unit="shape")
    keep = ("loads_unique", "stores_unique", "dot_flops", "h100_bound_kernel", "h100_bound_floor")
    out = []
    for H, N in it:
        sh = shape_account(1, H, N, head_dim, torch.float16)
        out.append({"H": H, "N": N, "d": head_dim, "bound_batch": BOUND_BATCH,
                    "pipelines": {name: {k: r[k] for k in keep} for name, r in sh["pipelines"].items()}})
    return out


def run_build(smoke: bool = False, archs=ARCH_NAMES, workers: int | None = None, progress: bool = True) -> dict:
    """The whole suite: launches, compilations, standard-shape join; every number in one dict."""
    from pruneattn.bench.meta import environment
    from tools.gpu_build.report import shape_rows

    tools = toolchain()
    if "missing" in tools:
        raise RuntimeError(f"GPU build: {tools['missing']}")
    head_dims = (64,) if smoke else HEAD_DIMS
    shapes = SHAPES[:1] if smoke else SHAPES
    dtypes = ("float16",) if smoke else DTYPES
    launches = record(dtypes, head_dims, shapes, progress)
    jobs = [Job(launch, arch, "first" if smoke else "all" if arch == SHAPE_ARCH else "kept")
            for launch in launches for arch in archs]
    built = build_in_subprocess(jobs, workers=workers or min(4, os.cpu_count() or 1), progress=progress)
    account = in_interpreter("accounted", shapes=[list(s) for s in shapes], progress=progress)
    result = {
        "kind": "gpu build",
        "smoke": smoke,
        "environment": environment("cpu"),
        "toolchain": built["toolchain"],
        "archs": [a for a in archs if a not in built["skipped_archs"]],
        "skipped_archs": built["skipped_archs"],
        "arch_limits": [ARCHS[a].to_dict() for a in archs if a not in built["skipped_archs"]],
        "sweep": {"dtypes": [*dtypes, "bfloat16"], "head_dims": list(head_dims), "shapes": [list(s) for s in shapes]},
        "launches": len(launches),
        "candidates": ("the first autotune candidate its kernel's prune keeps" if smoke else
                       "every autotune candidate of its kernel for its dtype on sm_90, the candidates the prune keeps "
                       "on the other archs"),
        "rows": built["rows"],
        "account": account,
        "bound_batch": account[0]["bound_batch"] if account else None,
    }
    if SHAPE_ARCH in result["archs"]:
        result.update(shape_arch=SHAPE_ARCH, shape_head_dim=SHAPE_HEAD_DIM, shape_sms=ARCHS[SHAPE_ARCH].sms,
                      shape_rows=shape_rows(built["rows"], account, SHAPE_ARCH, ARCHS[SHAPE_ARCH].sms))
    return result
