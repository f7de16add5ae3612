"""The kernel account (tools.gpu_build): exact byte and FLOP counts, and the bounds they
must stay within. Counts come from Triton's interpreter, so they are exact and
deterministic: asserting them is no timing test."""
from __future__ import annotations

import math
import os

import pytest
import torch

from pruneattn.bench.roofline import h100_bound
from pruneattn.validate import QUERIES
from tools.gpu_build import account as A
from tools.gpu_build.hooks import check_interpreter
from tools.gpu_build.nxn import nxn_check
from tools.gpu_build.report import markdown

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the account runs the kernels in the interpreter")

# Two standard shapes (DeiT-T at 224; 6 heads at the overlapping-patch length), kept small for CI.
SHAPES = [(3, 197), (6, 325)]


@pytest.fixture(scope="module")
def accounts():
    return {shape: A.shape_account(1, *shape) for shape in SHAPES}


def test_hooks_count_masked_accesses_and_dots_exactly():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_dot(X, Y, Z, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(Y + offs, x, mask=offs < n - 1)
        a = tl.load(X + offs[:, None] * 0 + offs[None, :])  # (BLOCK, BLOCK), BLOCK unique addresses
        tl.store(Z + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))

    x = torch.randn(16)
    y = torch.zeros(16)
    z = torch.zeros(16, 16)
    def run():
        copy_dot[(1,)](x, y, z, 10, BLOCK=16)
        return {}

    acc = A.account("copy_dot", run, {"x": x, "y": y, "z": z})
    assert acc.by_buffer["x"].loads == (10 + 16 * 16) * 4
    assert acc.by_buffer["x"].loads_unique == 16 * 4
    assert acc.by_buffer["y"].stores == acc.by_buffer["y"].stores_unique == 9 * 4
    assert acc.by_buffer["z"].stores_unique == 256 * 4
    assert acc.dot_flops == 2 * 16 * 16 * 16
    assert "other" not in acc.by_buffer


def test_counts_are_linear_in_batch():
    one = A.kernel_accounts(1, 3, 197)
    two = A.kernel_accounts(2, 3, 197)
    for name, a in one.items():
        b = two[name]
        assert (b.total.loads, b.total.loads_unique, b.total.stores, b.total.stores_unique, b.dot_flops) == (
            2 * a.total.loads, 2 * a.total.loads_unique, 2 * a.total.stores, 2 * a.total.stores_unique, 2 * a.dot_flops
        ), name


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_kernel_reads_qkv_once_and_writes_a_few_floats_per_row(accounts, shape):
    H, N = shape
    sh = accounts[shape]
    B, d, es = sh["B"], sh["d"], sh["element_bytes"]
    qkv_bytes = B * H * N * d * es
    row_f32 = B * H * N * 4
    P = N - 1
    for query in QUERIES:
        fwd = sh["kernels"][f"attention_fwd[{query}]"]
        for buf in ("q", "k", "v"):
            assert fwd["by_buffer"][buf]["loads_unique"] == qkv_bytes, (query, buf)  # every byte read ...
        assert fwd["total"]["loads_unique"] == 3 * qkv_bytes  # ... and nothing else
        assert fwd["by_buffer"]["out"]["stores"] == qkv_bytes
        pipe = sh["pipelines"][f"fused {query} (var)"]
        floor = pipe["floor"]
        # Stores: output + scores + at most a few float32 per (batch, head, row), each address once.
        assert pipe["stores"] == pipe["stores_unique"]
        extra = pipe["stores"] - floor["stores"]
        assert extra <= 3 * row_f32, extra / row_f32
        expected_extra = 2 * row_f32  # lse + the class logits (cls) or the column means (mean)
        assert extra == expected_extra + B * P * 4  # ... + the head-mean weights for the fused token
        # Unique loads over the pipeline: Q + K + V, plus the per-row statistics read back (a few
        # float32 per row). Per pass, the column pass of query="mean" reads Q and K a second time.
        assert 3 * qkv_bytes <= pipe["loads_unique_union"] <= 3 * qkv_bytes + 2 * row_f32
        second_pass = 2 * qkv_bytes if query == "mean" else 0
        assert pipe["loads_unique"] <= 3 * qkv_bytes + second_pass + 3 * row_f32


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_against_sdpa(accounts, shape):
    sh = accounts[shape]
    flash = sh["sdpa_flash_model"]
    cls = sh["pipelines"]["fused cls (var)"]["dot_flops"]
    mean = sh["pipelines"]["fused mean (var)"]["dot_flops"]
    assert cls <= 1.05 * flash["dot_flops"]
    assert mean <= 2.05 * flash["dot_flops"]
    # Same tiling, exactly: the class row costs no extra dot.
    assert cls == flash["dot_flops"]
    assert flash["dot_flops"] >= flash["flops_exact"]


@pytest.mark.parametrize("shape", SHAPES)
def test_selection_and_side_kernels_stay_at_their_floor(accounts, shape):
    H, N = shape
    sh = accounts[shape]
    B, d, es = sh["B"], sh["d"], sh["element_bytes"]
    k = sh["keep"]
    C = H * d
    gather = sh["kernels"]["gather_kept"]
    assert gather["by_buffer"]["x"]["loads"] == B * (1 + k) * C * es  # only the kept rows are read
    assert gather["by_buffer"]["kept"]["stores"] == B * (1 + k) * C * es
    fuse = sh["kernels"]["gather_kept+fuse_dropped"]
    assert fuse["by_buffer"]["x"]["loads_unique"] == B * N * C * es  # kept + dropped rows, each once
    assert fuse["by_buffer"]["x"]["loads"] == B * N * C * es
    rows = sh["kernels"]["class_row"]
    assert rows["by_buffer"]["k"]["loads"] == B * H * N * d * es  # K once
    assert rows["by_buffer"]["q"]["loads"] == B * H * d * es  # query 0 only
    assert rows["by_buffer"]["logits"]["stores"] == B * H * N * 4 and rows["by_buffer"]["lse"]["stores"] == B * H * 4
    assert rows["total"]["stores"] == rows["total"]["stores_unique"] == B * H * (N + 1) * 4  # logits and lse
    for name, kern in sh["kernels"].items():
        assert kern["total"]["stores"] == kern["total"]["stores_unique"], name  # nothing stored twice
        assert "other" not in kern["by_buffer"], name  # no traffic outside the named buffers
    # Every statistic moves the same bytes (MAD sorts in registers).
    for query in QUERIES:
        base = sh["kernels"][f"head_statistic[{query},var]"]["total"]
        for stat in ("mad", "mean"):
            assert sh["kernels"][f"head_statistic[{query},{stat}]"]["total"] == base


def test_no_torch_op_makes_an_nxn_tensor():
    r = nxn_check(B=2, H=3, N=300, d=64)
    B, H, N, d = r["shape"]
    from pruneattn import cpu

    c = max(cpu.QUERY_CHUNK, d + 1)
    for path, rep in r["paths"].items():
        if path.startswith("reference"):
            assert rep["nxn_outputs"], "the detector must flag the eager path's N x N matrix"
            continue
        assert rep["nxn_outputs"] == [], path
        assert rep["largest_numel"] <= max(B * H * N * d, B * H * c * N), (path, rep["largest_output"])
    assert set(r["paths"]) >= {"cpu/cls", "cpu/mean", "triton/cls", "triton/mean"}


def test_markdown_report_and_h100_model(accounts):
    res = {
        "environment": {"date": "d", "torch": "t", "triton": "tr", "device": "cpu"},
        "batch": 1, "dtype": "float16", "shapes": list(accounts.values()), "nxn_check": None,
    }
    md = markdown(res)
    assert "model, not a measurement" in md
    assert md.count("| fused cls (var) |") == len(SHAPES)
    b = h100_bound(int(3.35e12), int(989e12 / 2))
    assert b["bound"] == "memory" and math.isclose(b["seconds"], 1.0)


def test_hooks_fail_clearly_without_hook_points(monkeypatch):
    from triton.runtime import interpreter

    monkeypatch.delattr(interpreter.InterpreterBuilder, "create_masked_load")
    with pytest.raises(RuntimeError, match="create_masked_load"):
        check_interpreter()


def test_command_line_writes_the_report_and_its_json(tmp_path, monkeypatch, capsys):
    """``python -m tools.gpu_build --account`` with the interpreter on runs in-process and writes both files."""
    import functools
    import json

    from tools.gpu_build import __main__ as cli
    from tools.gpu_build import nxn

    monkeypatch.setattr(nxn, "nxn_check", functools.partial(nxn.nxn_check, B=1, H=2, N=70, d=16))  # a small check
    assert cli.main(["--account", "--shapes", "2:17", "--no-progress", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "account.md").read_text()
    assert md in capsys.readouterr().out
    assert md.count("| 2 | 17 | fused cls (var) |") == 1 and "## N x N check" in md
    data = json.loads((tmp_path / "account.json").read_text())
    assert [(s["H"], s["N"], s["B"]) for s in data["shapes"]] == [(2, 17, 1)]


def test_command_line_reruns_itself_with_the_interpreter(tmp_path, monkeypatch):
    """Without TRITON_INTERPRET the account runs in a child process that has it, from this checkout."""
    import pruneattn.backend
    from tools.gpu_build import __main__ as cli
    from tools.gpu_build.child import ROOT

    calls = []
    monkeypatch.setattr(pruneattn.backend, "interpreting", lambda: False)
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    assert cli.main(["--account", "--smoke", "--out", str(tmp_path)]) == 0
    ((cmd, env),) = calls
    assert cmd[1:] == ["-m", "tools.gpu_build", "--account", "--batch", "1", "--out", str(tmp_path), "--smoke"]
    assert env["TRITON_INTERPRET"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_command_line_needs_a_suite_and_says_when_it_cannot_build(monkeypatch, capsys):
    from tools.gpu_build import __main__ as cli
    from tools.gpu_build import build

    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "--account, --build or both" in capsys.readouterr().err
    monkeypatch.setattr(build, "toolchain", lambda: {"missing": "no ptxas"})
    assert cli.main(["--build", "--smoke"]) == 2
    assert "cannot build for a GPU here: no ptxas" in capsys.readouterr().err
