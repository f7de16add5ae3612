"""The Triton kernels compile for real GPUs (sm_90, sm_80) on a machine without one.

Every launch the public ops make is recorded in the interpreter, then compiled with Triton's CUDA
pipeline and ``ptxas``: every autotune candidate at d = 64 in float16 and bfloat16 for sm_90, the
first candidate for sm_80, and for float32 and d = 128. Fails on a compile error, a spill, a 16-bit
``tl.dot`` without tensor-core instructions, or a launch whose pruned candidates overflow shared memory.
"""
from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from tools.gpu_build import build as B
from tools.gpu_build.arch import ARCHS, occupancy
from tools.gpu_build.launches import Launch, with_bfloat16

TOOLS = B.toolchain()
needs_toolchain = pytest.mark.skipif("missing" in TOOLS, reason=f"no GPU toolchain: {TOOLS.get('missing')}")


def _subset(launches: list[Launch]) -> list[B.Job]:
    """Every kernel; every candidate at d = 64 in 16 bits for sm_90; the first one the prune keeps for
    sm_80, for float32 and for d = 128."""
    jobs = []
    for launch in launches:
        sixteen = launch.dtype in ("float16", "bfloat16")
        if sixteen and launch.head_dim in (64, None):
            jobs += [B.Job(launch, "sm_90", "all"), B.Job(launch, "sm_80", "first")]
        else:
            jobs.append(B.Job(launch, "sm_90", "first"))
    return jobs


@pytest.fixture(scope="module")
def launches() -> list[Launch]:
    from tools.gpu_build import suite

    return suite.record(("float16", "float32"), (64, 128), ((3, 197),))


@pytest.fixture(scope="module")
def built(launches):
    if "missing" in TOOLS:
        pytest.skip(f"no GPU toolchain: {TOOLS['missing']}")
    return B.build_in_subprocess(_subset(launches), workers=2)


def _kernel_names() -> set[str]:
    """Every kernel defined in pruneattn.kernels (a JIT function or an autotuner named ``_*_kernel``)."""
    import pruneattn.kernels as pk

    names = set()
    for info in pkgutil.iter_modules(pk.__path__):
        module = importlib.import_module(f"pruneattn.kernels.{info.name}")
        for attr in vars(module):
            if attr.startswith("_") and attr.endswith("_kernel"):
                names.add(attr.strip("_").removesuffix("_kernel"))
    return names


def test_the_sweep_launches_every_kernel_in_every_variant(launches):
    assert {launch.name for launch in launches} == _kernel_names()
    attention = {(la.dtype, la.head_dim, dict(la.constexprs)["STORE_CLS"]) for la in launches if la.name == "attention_fwd"}
    assert attention == {(dt, d, cls) for dt in ("float16", "bfloat16", "float32") for d in (64, 128) for cls in (True, False)}
    masked = {(la.name, la.dtype, dict(la.constexprs).get("STORE_CLS")) for la in launches
              if dict(la.constexprs).get("HAS_MASK") and la.name in ("attention_fwd", "column_mean", "select_topk")}
    assert masked >= {("attention_fwd", dt, cls) for dt in ("float16", "float32") for cls in (True, False)}
    assert {("column_mean", dt, None) for dt in ("float16", "float32")} <= masked
    assert {("select_topk", None, None)} <= {(n, None, None) for n, _, _ in masked}
    stats = {(dict(la.constexprs)["STAT"], dict(la.constexprs)["IS_CLS"]) for la in launches if la.name == "head_statistic"}
    assert stats == {(s, c) for s in (0, 1, 2) for c in (True, False)}
    assert {la.dtype for la in launches if la.name == "fuse"} == {"float16", "bfloat16", "float32"}
    for la in launches:
        if la.name in ("attention_fwd", "column_mean"):
            assert la.tuned == ("BLOCK_M", "BLOCK_N")
            assert la.dot_bits == ((16,) if la.dtype != "float32" else (32,))


def test_bfloat16_copies_swap_only_the_16_bit_tensors(launches):
    fp16 = next(la for la in launches if la.name == "attention_fwd" and la.dtype == "float16")
    bf16 = [la for la in with_bfloat16([fp16]) if la.dtype == "bfloat16"]
    assert len(bf16) == 1
    types = dict(bf16[0].signature)
    assert types["Q"] == types["Out"] == "*bf16" and types["Lse"] == "*fp32" and types["qk_scale"] == "fp32"
    assert dict(bf16[0].constexprs)["DTYPE_KEY"] == "torch.bfloat16"
    assert with_bfloat16([la for la in launches if la.name == "select_topk"]) == [
        la for la in launches if la.name == "select_topk"]


@needs_toolchain
def test_every_variant_compiles_without_spills(built, launches):
    rows = built["rows"]
    assert not built["skipped_archs"]
    assert {r["kernel"] for r in rows} == _kernel_names()
    errors = [(r["launch"], r["arch"], r["config"], r["error"]) for r in rows if r["error"]]
    assert not errors, errors
    spills = [(r["launch"], r["arch"], r["config"], r["registers"], r["spill_bytes"]) for r in rows if r["spill_bytes"]]
    assert not spills, spills
    assert all(0 < r["registers"] <= 255 for r in rows)
    # Every 16-bit autotune candidate of the d = 64 attention kernels was built for sm_90 (cls and mean,
    # with and without a padding mask).
    from pruneattn.kernels.attention import _CONFIGS

    tuned = [r for r in rows if r["kernel"] == "attention_fwd" and r["arch"] == "sm_90" and r["head_dim"] == 64
             and r["dtype"] == "bfloat16"]
    assert sorted(r["candidate"] for r in tuned) == sorted(list(range(len(_CONFIGS))) * 4)


@needs_toolchain
def test_16_bit_dots_run_on_tensor_cores(built):
    dots = [r for r in built["rows"] if r["dot_bits"] == [16]]
    assert {r["kernel"] for r in dots} == {"attention_fwd", "column_mean"}
    missing = [(r["launch"], r["arch"], r["config"]) for r in dots if not r["tensor_cores"]]
    assert not missing, missing
    assert {r["tensor_cores"] for r in dots if r["arch"] == "sm_80"} == {"mma.sync"}


@needs_toolchain
def test_the_prune_keeps_only_candidates_that_fit(built):
    by_launch: dict[tuple, list[dict]] = {}
    for r in built["rows"]:
        by_launch.setdefault((r["launch"], r["arch"]), []).append(r)
    for (launch, arch), rs in by_launch.items():
        assert any(r["kept_by_prune"] and r["smem_fits"] for r in rs), (launch, arch)
        over = [r["config"] for r in rs if r["kept_by_prune"] and not r["smem_fits"]]
        assert not over, (launch, arch, over)


@needs_toolchain
def test_spills_are_detected_and_pruned(launches):
    """Poison: 128 rows on 4 warps at head width 128 spill on sm_80; the check sees it, the prune drops it
    (and every other candidate that spills there)."""
    launch = next(la for la in launches if la.name == "attention_fwd" and la.dtype == "float16" and la.head_dim == 128
                  and dict(la.constexprs)["STORE_CLS"])
    poison = (("BLOCK_M", 128), ("BLOCK_N", 64), ("num_warps", 4), ("num_stages", 3))
    rows = B.build_in_subprocess([B.Job(launch, "sm_80", config=poison), B.Job(launch, "sm_80", "all")])["rows"]
    (forced,) = [r for r in rows if r["candidate"] is None]
    assert forced["error"] is None and forced["spill_bytes"] > 0
    candidates = [r for r in rows if r["candidate"] is not None]
    assert len(candidates) == 5  # every 16-bit candidate
    spilled = {(r["config"]["BLOCK_M"], r["config"]["BLOCK_N"], r["config"]["num_warps"])
               for r in candidates if r["spill_bytes"] > 0}
    assert (128, 64, 4) in spilled
    assert not any(r["kept_by_prune"] for r in candidates if r["spill_bytes"] > 0)  # the prune drops them
    assert any(r["kept_by_prune"] for r in candidates)


def test_occupancy_formula_by_hand():
    h100 = ARCHS["sm_90"]
    # 214 registers x 32 lanes = 6848, rounded up to 6912 per warp; 65536 // 6912 = 9 warps: one CTA of 8 warps.
    occ = occupancy(h100, 214, 8, 24576 + 1024)
    assert occ["by"]["registers"] == 1 and occ["ctas_per_sm"] == 1 and occ["limited_by"] == ["registers"]
    # 32 registers, 4 warps: 16 CTAs by registers and by threads; 8 KB smem: 233472 // 9216 = 25.
    occ = occupancy(h100, 32, 4, 8192)
    assert occ["by"] == {"registers": 16, "shared_memory": 25, "threads": 16, "cta_cap": 32}
    assert occ["ctas_per_sm"] == 16 and occ["warp_occupancy"] == 1.0
    # Shared memory binds: 100 KB per CTA on an A100 (164 KB per SM).
    assert occupancy(ARCHS["sm_80"], 64, 4, 100 * 1024)["limited_by"] == ["shared_memory"]


def test_resource_and_tensor_core_parsing():
    text = "Resource usage:\n Common:\n  GLOBAL:0\n Function _k:\n  REG:96 STACK:8 SHARED:1024 LOCAL:8 CONSTANT[0]:600\n"
    m = B._RESOURCE.search(text)
    assert (m[2], m[3], m[4], m[5]) == ("96", "8", "1024", "8")
    assert B.tensor_core_op("fma.rn.f32 ...", ARCHS["sm_90"]) is None
    assert B.tensor_core_op("wgmma.mma_async.sync.aligned.m64n64k16", ARCHS["sm_90"]) == "wgmma.mma_async"
    assert B.tensor_core_op("mma.sync.aligned.m16n8k16.row.col", ARCHS["sm_90"]) == "mma.sync"


def test_prune_keeps_at_least_one_and_drops_what_overflows():
    from pruneattn.kernels import _config
    from pruneattn.kernels.attention import _CONFIGS

    est, consts = _config.attention_smem, {"BLOCK_D": 256}
    sizes = [est(c, 2, consts) for c in _CONFIGS]
    kept = _config.fitting(_CONFIGS, est, 2, consts, sorted(sizes)[1])
    assert len(kept) == 2 and all(est(c, 2, consts) <= sorted(sizes)[1] for c in kept)
    assert _config.fitting(_CONFIGS, est, 2, consts, 0) == [_CONFIGS[sizes.index(min(sizes))]]
    assert _config.fitting(_CONFIGS, est, 2, consts, None) == list(_CONFIGS)


def test_prune_picks_the_candidates_of_the_dtype():
    from pruneattn.kernels import _config
    from pruneattn.kernels.attention import _CONFIGS, _attention_fwd_kernel

    prune = _attention_fwd_kernel.early_config_prune
    assert isinstance(prune, _config.ConfigPrune)  # what the GPU build looks for
    every = _CONFIGS + _config.FP32_ATTENTION_CONFIGS
    # On CPU tensors there is no shared-memory limit: only the dtype and the tile sizes decide.
    half = prune(every, {"Q": torch.empty(1, dtype=torch.float16)}, BLOCK_D=32)
    assert half == _CONFIGS
    half = prune(every, {"Q": torch.empty(1, dtype=torch.float16)}, BLOCK_D=64)
    assert half == [c for c in _CONFIGS if (c.kwargs["BLOCK_M"], c.num_warps) != (128, 4)]
    (widest,) = prune(every, {"Q": torch.empty(1, dtype=torch.float16)}, BLOCK_D=256)
    assert (widest.kwargs, widest.num_warps) == ({"BLOCK_M": 64, "BLOCK_N": 32}, 4)
    single = prune(every, {"Q": torch.empty(1, dtype=torch.float32)}, BLOCK_D=64)
    assert single and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * 64 <= _config.FP32_ATTENTION_TILE for c in single)
    # Head dim 256 in float32: no candidate is within the tile limit, the smallest one stays.
    (smallest,) = prune(every, {"Q": torch.empty(1, dtype=torch.float32)}, BLOCK_D=256)
    assert smallest.kwargs == {"BLOCK_M": 16, "BLOCK_N": 16}
    # The limit a build passes in: 40 KB keeps only the 16-bit candidates that the estimate fits.
    small = prune.for_limit(every, 2, {"BLOCK_D": 64}, 40 * 1024)
    assert small and all(_config.attention_smem(c, 2, {"BLOCK_D": 64}) <= 40 * 1024 for c in small)
    assert len(small) < len(_CONFIGS)
