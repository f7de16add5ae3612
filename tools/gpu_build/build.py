"""Compile recorded kernel launches for real GPU targets, with no GPU, and read what the compiler made.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))`` runs
Triton's whole CUDA pipeline (TTIR, TTGIR, LLVM IR, PTX, ``ptxas``) on this machine. From the result:

- registers per thread, spills and static shared memory: ``cuobjdump --dump-resource-usage`` on the
  cubin (spills: the stack frame plus local memory per thread, where ``ptxas`` puts the registers it
  runs out of; these kernels have no calls that would use a stack otherwise), and the local-memory
  stores (``STL``) in the SASS (``cuobjdump -sass``) (both tools ship with Triton, in ``triton/backends/nvidia/bin``);
- dynamic shared memory: ``compiled.metadata.shared`` (what the launcher would request);
- tensor cores: the PTX's MMA instructions (``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80,
  ``tcgen05.mma`` on sm_100).

Each recorded launch is compiled with every autotune candidate of its kernel for its dtype (the full
list, not the one the interpreter pins; float32 has its own smaller tiles) and the kernel's
``early_config_prune`` says which candidates a GPU with the target's shared memory would keep. The kernels must be compiled, not interpreted: this runs in a
process without ``TRITON_INTERPRET`` (:func:`build_in_subprocess` starts one).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import triton
import triton.language as tl

from pruneattn._progress import progress_bar
from pruneattn.kernels._config import ConfigPrune
from tools.gpu_build.arch import ARCHS, Arch, occupancy
from tools.gpu_build.child import child_env
from tools.gpu_build.launches import Launch, tl_value

__all__ = ["Job", "build", "build_in_subprocess", "candidates", "compile_variant", "dtype_candidates", "kept_by_prune", "toolchain"]

_RESOURCE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def toolchain() -> dict:
    """Paths of ptxas and cuobjdump, or ``{"missing": reason}`` when the GPU build cannot run here."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return {"missing": f"triton's compiler API is not importable: {e}"}
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return {"missing": "this triton has no NVIDIA backend"}
    found = {}
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for tool in ("ptxas", "cuobjdump"):
        path = None
        try:
            path = getattr(triton.knobs.nvidia, tool).path
        except (AttributeError, RuntimeError):
            pass
        path = path or shutil.which(os.path.join(bin_dir, tool)) or shutil.which(tool)
        if not path or not os.access(path, os.X_OK):
            return {"missing": f"{tool} not found (looked in {bin_dir} and on PATH)"}
        found[tool] = path
    return found


@triton.jit
def _probe_kernel(X):
    tl.store(X, 1.0)


def arch_reason(arch: Arch) -> str | None:
    """Why this triton cannot build for ``arch`` (a trivial kernel fails to compile), or ``None``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        triton.compile(ASTSource(_jit_fn(_probe_kernel), {"X": "*fp32"}, {}), target=GPUTarget("cuda", arch.capability, 32))
    except Exception as e:  # noqa: BLE001 - any refusal is the reason
        return f"triton {triton.__version__} cannot compile for {arch.name}: {type(e).__name__}: {str(e).strip()[:200]}"
    return None


def _kernel(launch: Launch):
    module, attr = launch.kernel.split(":")
    return getattr(importlib.import_module(module), attr)


def _jit_fn(obj):
    from triton.runtime.jit import JITFunction

    fn = obj
    while not isinstance(fn, JITFunction):
        if not hasattr(fn, "fn"):
            raise RuntimeError(
                f"{obj} is not a compiled JITFunction (was TRITON_INTERPRET set in the build process?)")
        fn = fn.fn
    return fn


@dataclass(frozen=True)
class Job:
    """Compile ``launch`` for ``arch`` with its autotune candidates (see ``which``), or with ``config``.

    ``config`` (``{"BLOCK_M": ..., "num_warps": ..., "num_stages": ...}``) compiles a setting that is
    not among the kernel's candidates (experiments, and the tests' check that spills are detected).
    """

    launch: Launch
    arch: str
    which: str = "all"  # "all": every candidate for the dtype; "kept": those kept on the arch; "first": the first kept
    config: tuple[tuple[str, int], ...] | None = None

    def to_dict(self) -> dict:
        return {"launch": self.launch.to_dict(), "arch": self.arch, "which": self.which,
                "config": None if self.config is None else [list(p) for p in self.config]}

    @staticmethod
    def from_dict(d: dict) -> Job:
        return Job(Launch.from_dict(d["launch"]), d["arch"], d["which"],
                   None if d["config"] is None else tuple(tuple(p) for p in d["config"]))


def candidates(launch: Launch) -> list:
    """The kernel's autotune configs (all of them), or one config of the launch's own options."""
    import triton

    obj = _kernel(launch)
    if launch.tuned:
        return list(obj.configs)
    opts = dict(launch.options)
    return [triton.Config({}, num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3))]


def _prune(launch: Launch) -> ConfigPrune | None:
    """The kernel's autotune prune, if it is pruneattn's :class:`ConfigPrune`."""
    prune = getattr(_kernel(launch), "early_config_prune", None)
    return prune if isinstance(prune, ConfigPrune) else None


def _pruned(launch: Launch, limit: int | None, before_limits: bool = False) -> list[int]:
    configs = candidates(launch)
    prune = _prune(launch)
    if not launch.tuned or prune is None:
        return list(range(len(configs)))
    consts = dict(launch.constexprs)
    kept = prune.for_element(configs, _element_size(launch), consts) if before_limits else prune.for_limit(
        configs, _element_size(launch), consts, limit)
    return [i for i, c in enumerate(configs) if any(c is k for k in kept)]


def smem_estimate(launch: Launch, config) -> int | None:
    """The kernel prune's shared-memory estimate for ``config`` (``None`` for kernels without one)."""
    prune = _prune(launch)
    return None if prune is None else int(prune.estimate(config, _element_size(launch), dict(launch.constexprs)))


def dtype_candidates(launch: Launch) -> list[int]:
    """Indices of the kernel's candidates for the launch's dtype, before the prune's tile and memory limits."""
    return _pruned(launch, None, before_limits=True)


def kept_by_prune(launch: Launch, arch: Arch) -> list[int]:
    """Indices of the candidates the kernel's ``early_config_prune`` keeps on ``arch`` (dtype and shared memory)."""
    return _pruned(launch, arch.smem_per_block)


def _element_size(launch: Launch) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4}.get(launch.dtype, 4)


def _source(launch: Launch, config):
    from triton.compiler import ASTSource

    fn = _jit_fn(_kernel(launch))
    consts = {**{k: tl_value(v) for k, v in launch.constexprs}, **config.kwargs}
    types = dict(launch.signature)
    signature = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    params = inspect.signature(ASTSource.__init__).parameters
    attrs = None
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        attrs = {(fn.arg_names.index(n),): CUDABackend.parse_attr(spec) for n, spec in launch.attrs}
    except (ImportError, AttributeError):
        pass
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    return ASTSource(fn, signature, constants=consts, attrs=attrs)  # older spelling


def _resources(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout
    m = _RESOURCE.search(out)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    return {"registers": int(m[2]), "stack_bytes": int(m[3]), "static_shared_bytes": int(m[4]), "local_bytes": int(m[5]),
            "local_stores": len(re.findall(r"\bSTL(?:\.\w+)*\b", sass))}


def tensor_core_op(ptx: str, arch: Arch) -> str | None:
    """The first of the arch's tensor-core MMA instructions the PTX contains, if any."""
    for op in arch.tensor_core_ops:
        if op in ptx:
            return op
    return None


def _config(settings: dict):
    import triton

    meta = {k: v for k, v in settings.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=settings.get("num_warps", 4), num_stages=settings.get("num_stages", 3))


def compile_variant(launch: Launch, arch: Arch, candidate: int | None, config, tools: dict) -> dict:
    """Compile one launch with one config for one arch: resources, tensor cores, fit, occupancy (or the error).

    ``candidate`` is the config's index among the kernel's autotune configs (``None``: not one of them).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    row = {
        "kernel": launch.name, "arch": arch.name, "dtype": launch.dtype, "head_dim": launch.head_dim,
        "constexprs": {k: v for k, v in launch.constexprs if not k.startswith("stride_")}, "candidate": candidate,
        "config": {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages},
        "dot_bits": list(launch.dot_bits), "launch": launch.key_str(),
    }
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(_source(launch, config), target=GPUTarget("cuda", arch.capability, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        res = _resources(compiled.asm["cubin"], tools["cuobjdump"])
    except Exception as e:  # noqa: BLE001 - a compile error is a result here
        row.update(error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
                   compile_s=round(time.perf_counter() - t0, 3))
        return row
    smem = int(compiled.metadata.shared) + res["static_shared_bytes"]
    num_warps = int(getattr(compiled.metadata, "num_warps", config.num_warps))
    row.update(
        error=None,
        compile_s=round(time.perf_counter() - t0, 3),
        **res,
        spill_bytes=res["stack_bytes"] + res["local_bytes"],
        dynamic_shared_bytes=int(compiled.metadata.shared),
        shared_bytes=smem,
        smem_fits=smem <= arch.smem_per_block,
        smem_estimate=smem_estimate(launch, config),
        tensor_cores=tensor_core_op(compiled.asm["ptx"], arch),
        occupancy=occupancy(arch, res["registers"], num_warps, smem),
    )
    return row


def build(jobs: Sequence[Job], progress: bool = False) -> dict:
    """Compile every job: one row per (launch, arch, config), and the candidates the prune keeps."""
    tools = toolchain()
    if "missing" in tools:
        raise RuntimeError(f"GPU build: {tools['missing']}")
    it = progress_bar(jobs, enabled=progress, desc="compiling for GPU targets", unit="launch")
    rows = []
    skipped = {a: r for a in sorted({j.arch for j in jobs}) if (r := arch_reason(ARCHS[a]))}
    for job in it:
        arch = ARCHS[job.arch]
        if job.arch in skipped:
            continue
        if job.config is not None:
            rows.append(compile_variant(job.launch, arch, None, _config(dict(job.config)), tools))
            continue
        configs = candidates(job.launch)
        kept = kept_by_prune(job.launch, arch)
        chosen = {"all": dtype_candidates(job.launch), "kept": kept, "first": kept[:1]}[job.which]
        for i in chosen:
            row = compile_variant(job.launch, arch, i, configs[i], tools)
            row["candidates"] = len(configs)
            row["dtype_candidates"] = len(dtype_candidates(job.launch))
            row["kept_by_prune"] = i in kept
            rows.append(row)
    return {"rows": rows, "toolchain": tools, "skipped_archs": skipped}


def _worker(payload: str, out_path: str) -> None:
    data = json.loads(payload)
    jobs = [Job.from_dict(j) for j in data["jobs"]]
    res = build(jobs, progress=data.get("progress", False))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(res, f)


def build_in_subprocess(jobs: Sequence[Job], workers: int = 1, progress: bool = False, timeout: float | None = None) -> dict:
    """:func:`build` in ``workers`` fresh processes without ``TRITON_INTERPRET`` (the kernels compiled,
    not interpreted); the rows come back in job order. Jobs are dealt out largest first."""
    env = child_env(interpret=False)
    workers = max(1, min(workers, len(jobs)))
    shards: list[list[Job]] = [[] for _ in range(workers)]
    for n, job in enumerate(sorted(jobs, key=lambda j: -(5 if j.launch.tuned and j.which != "first" else 1))):
        shards[n % workers].append(job)
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for i, shard in enumerate(shards):
            payload = json.dumps({"jobs": [j.to_dict() for j in shard], "progress": progress and i == 0})
            inp, out = os.path.join(d, f"in{i}.json"), os.path.join(d, f"out{i}.json")
            with open(inp, "w", encoding="utf-8") as f:
                f.write(payload)
            code = ("import sys; from tools.gpu_build.build import _worker; "
                    "_worker(open(sys.argv[1]).read(), sys.argv[2])")
            procs.append((subprocess.Popen([sys.executable, "-c", code, inp, out], env=env), out))
        results = []
        for p, out in procs:
            if p.wait(timeout=timeout) != 0:
                raise RuntimeError(f"GPU build worker failed with exit code {p.returncode}")
            with open(out, encoding="utf-8") as f:
                results.append(json.load(f))
    order = {j.launch.key_str() + "@" + j.arch: n for n, j in enumerate(jobs)}
    rows = sorted((r for res in results for r in res["rows"]),
                  key=lambda r: (order.get(r["launch"] + "@" + r["arch"], 0), r["candidate"] is None, r["candidate"] or 0))
    skipped = {a: r for res in results for a, r in res["skipped_archs"].items()}
    return {"rows": rows, "toolchain": results[0]["toolchain"], "skipped_archs": skipped}
