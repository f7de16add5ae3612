"""The GPU suite's plumbing, run on the CPU with tiny shapes (Triton kernels in the interpreter), so that
it works the first time a GPU is there: every candidate runs and computes what its name says, results
carry their metadata, the files get written, and the FLOP-count bound matches torch's own FLOP counter."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import pruneattn
from pruneattn.bench import models as M
from pruneattn.bench import ops_suite as S
from pruneattn.backend import backend_for, use_backend

META = {"device", "torch", "triton", "date", "dtype"}


def test_attention_candidates_compute_the_same_scores(device):
    B, H, N = 2, 3, 40
    _, (q, k, v) = S._qkv(B, H, N, 64, torch.float32, device)
    backend = backend_for(device)
    with use_backend(backend):
        fns = S.attention_candidates(q, k, v, backend)
        results = {name: fn() for name, fn in fns.items()}
    ref_out, ref_scores = S._eager_scores(*(t.double() for t in (q, k, v)))
    for name, res in results.items():
        out = res if name == "sdpa" else res[0]
        torch.testing.assert_close(out.double(), ref_out, atol=1e-4, rtol=1e-4, msg=name)
        if name.endswith("cls var") and name != "sdpa":
            torch.testing.assert_close(res[1].double(), ref_scores.double(), atol=1e-6, rtol=1e-3, msg=name)
    if backend == "triton":
        assert {"fused cls var", "sdpa cls var", "fused cls mad", "sdpa cls mean", "fused mean-query var"} <= set(fns)


def test_selection_candidates_keep_the_same_tokens(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 16, generator=g).to(device)
    scores = torch.rand(2, 29, generator=g).to(device)
    with use_backend(backend_for(device)):
        res = {name: fn() for name, fn in S.selection_candidates(x, scores, torch.rand(2, 29).to(device)).items()}
    for name in ("pruneattn drop", "torch topk+sort+gather", "torch stable sort+gather (reference)"):
        torch.testing.assert_close(res[name][0], res["pruneattn drop"][0], msg=name)
    assert res["pruneattn fuse"][0].shape[1] == res["pruneattn drop"][0].shape[1] + 1


def test_cli_ops_and_models_smoke_writes_results(tmp_path):
    from pruneattn.bench import main

    assert main(["--ops", "--models", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    ops = json.loads((tmp_path / "ops.json").read_text())
    suites = {r["suite"] for r in ops["rows"]}
    assert suites == {"attention+scores", "selection+gather", "forward+backward"}
    for r in ops["rows"]:
        assert META <= set(r) and {"B", "H", "N", "d"} <= set(r) and r["median_ms"] > 0
    assert {"device", "torch", "triton", "date", "threads"} <= set(ops["environment"])
    models = json.loads((tmp_path / "models.json").read_text())
    configs = {r["config"] for r in models["rows"] if r["suite"] == "models"}
    assert {"unpatched", "pruneattn var 0.7 drop", "pruneattn mad 0.5 fuse", "EViT-style eager var 0.7 drop"} == configs
    assert any(r["suite"] == "models train step" for r in models["rows"])
    for r in models["rows"]:
        assert META <= set(r) and r["images_per_s"] > 0
    for stem in ("ops", "models"):
        assert (tmp_path / f"{stem}.md").read_text().startswith("# ")
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000


def test_choices_table_round_trip(tmp_path, monkeypatch):
    from pruneattn import backend

    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"choices": [{"device": "cpu", "dtype": "float16", "H": 2, "d": 64, "N": 17, "backend": "sdpa"}]}))
    monkeypatch.setattr(backend, "_CHOICES", {})
    assert backend.load_choices(path) == 1
    assert backend.attention_kernel(torch.empty(1, 2, 17, 64, dtype=torch.float16), "cls") == "sdpa"


@pytest.mark.parametrize("config", [M.UNPATCHED, M.pruned("var", 0.7), M.pruned("mad", 0.5), M.pruned("var", 0.7, layers=(0, 2))])
def test_flop_bound_matches_torch_flop_counter(config, monkeypatch):
    """The benchmark's FLOP count equals torch's FlopCounterMode on the eager-attention model."""
    from torch.utils.flop_counter import FlopCounterMode

    from pruneattn import reference as R
    from pruneattn.ops import AttentionStats

    def eager_stats(q, k, v, *, stat, query, num_prefix, scale, valid=None, unit=1):  # plain torch ops: counted
        assert valid is None and unit == 1
        attn = R.attention_probs(q, k, scale)
        a = R.received_attention(attn, query)[:, :, num_prefix:]
        return AttentionStats(attn @ v, R.head_statistic(a, stat).float(), a.mean(dim=1).float())

    monkeypatch.setattr(importlib.import_module("pruneattn.patch.prune"), "attention_stats", eager_stats)
    model = M.build("deit_tiny_patch16_224", config, img_size=64)
    shape = M.model_shape(model)
    for blk in model.blocks:  # eager attention in the other blocks too, so that the counter sees Q K^T and P V
        blk.attn.fused_attn = False
    x = M.images(2, 64)
    with torch.no_grad(), pruneattn.use_backend("reference"), FlopCounterMode(display=False) as fc:
        model(x)
    assert fc.get_total_flops() == 2 * M.model_flops(shape, config)  # batch 2
    M.check_tokens(model, config, shape, x)


def test_token_schedule_deit_small():
    model = M.build("deit_small_patch16_224", M.UNPATCHED)
    shape = M.model_shape(model)
    sched = M.token_schedule(shape, M.pruned("var", 0.7))
    assert [s[1] for s in sched] == [197] * 3 + [139] * 3 + [98] * 3 + [69] * 3
    assert 1.4 < M.flop_bound(shape, M.pruned("var", 0.7)) < 1.6


def test_cpu_smoke_run_says_so_everywhere_judges_nothing_and_is_quiet(tmp_path):
    """``pruneattn bench --smoke`` on a CPU, as a user runs it: every output names the smoke run, no speed
    verdict appears, and the profiler's C++ log lines do not reach the terminal."""
    import time

    from pruneattn.bench import SMOKE_NOTE, TIMING_VERDICTS
    from tools.gpu_build.child import child_env

    env = child_env(interpret=False)  # this checkout's package, without the interpreter (as a user runs it)
    env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pruneattn.bench", "--smoke", "--no-progress", "--threads", "1",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    assert seconds < 120, seconds  # seconds on an idle machine; generous for a shared CI runner
    for noise in ("USDT", "gpuGetDeviceCount", "CPUAllocator", "profiler_start"):
        assert noise not in res.stderr and noise not in res.stdout, noise
    assert res.stdout.count(SMOKE_NOTE) == 2 and res.stdout.count("(smoke run)") == 2
    for stem in ("cpu_ops", "cpu_models"):
        md = (tmp_path / f"{stem}.md").read_text()
        assert SMOKE_NOTE in md and "(smoke run)" in md.splitlines()[0]
        data = json.loads((tmp_path / f"{stem}.json").read_text())
        assert data["smoke"] is True and data["note"] == SMOKE_NOTE
        assert all(r["smoke"] is True for r in data["rows"])
        assert not any(k in TIMING_VERDICTS for c in data["checks"] for k in c)
        assert not any(k in md for k in TIMING_VERDICTS)


def test_profiler_noise_is_dropped_and_other_native_output_kept(capfd):
    from pruneattn.bench.quiet import drop_noise, profiler_noise_filtered

    noise = ("USDT:2026-11-25 04:25:22 8820:8820 SyncActivityProfilerHandler.cpp:39] profiler_start\n"
             "ERROR:2026-11-25 04:25:22 8820:8820 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n"
             "[W1125 04:25:32.176524299 CPUAllocator.cpp:245] Memory block of unknown size was allocated before "
             "the profiling started, profiler results will not include the deallocation event\n")
    assert drop_noise(noise + "a real error\n") == "a real error\n"
    with profiler_noise_filtered():
        os.write(2, (noise + "a real error\n").encode())
    err = capfd.readouterr().err
    assert "a real error" in err and "USDT" not in err and "gpuGetDeviceCount" not in err and "CPUAllocator" not in err
