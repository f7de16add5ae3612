"""``pruneattn bench`` explains every column it prints: under each table, and in docs/performance.md."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


from pruneattn import bench
from pruneattn.bench import legend

ROOT = Path(__file__).resolve().parents[1]
SUITE_COLUMNS = {name: getattr(bench, name) for name in dir(bench) if name.endswith("_COLUMNS")}


def table_columns(text: str) -> list[list[str]]:
    """The header of every table in ``text``: plain-text tables (a header over a line of dashes) and Markdown."""
    lines = text.splitlines()
    out = []
    for head, rule in zip(lines, lines[1:]):
        if re.fullmatch(r"-+(  -+)*", rule.strip()) and head.strip():
            out.append(head.split())
        elif rule.startswith("|---") and head.startswith("|"):
            out.append([c.strip() for c in head.strip("|").split("|")])
    return out


def explained(text: str, column: str) -> bool:
    """Whether ``text`` holds a legend line for ``column`` (terminal or Markdown form) that says something."""
    c = re.escape(column)
    return bool(re.search(rf"^  {c} +\S", text, re.M) or re.search(rf"^- `{c}`: \S", text, re.M))


def test_table_parser():
    text = "a  bb\n-  --\n1  2\n\n| x | y |\n|---|---|\n| 1 | 2 |\n"
    assert table_columns(text) == [["a", "bb"], ["x", "y"]]
    assert explained("columns:\n  bb  the b\n", "bb") and not explained("columns:\n  bb\n", "bb")


def test_every_suite_column_is_explained():
    assert len(SUITE_COLUMNS) >= 6
    for name, columns in SUITE_COLUMNS.items():
        assert not legend.missing(columns), (name, legend.missing(columns))


def test_legend_prints_the_columns_shown():
    text = legend.legend(["speedup", "over_evit", "speedup"])
    assert text.splitlines()[0] == "columns:" and len(text.splitlines()) == 3
    assert explained(text, "speedup") and explained(text, "over_evit") and not explained(text, "flop_bound")


def test_targets_in_the_legend_are_the_suites_targets():
    from pruneattn.bench import cpu_ops, models_cpu, vlm

    C = legend.COLUMNS
    assert f"at most {cpu_ops.TARGETS['cls_over_sdpa']}" in C["cls_over_sdpa"]
    assert f"at most {cpu_ops.TARGETS['mean_over_sdpa']}" in C["mean_over_sdpa"]
    assert f"at least {cpu_ops.TARGETS['eager_over_cls_at_577']:g}" in C["eager_over_cls"]
    assert f"at least {models_cpu.TARGETS['bound_fraction']}" in C["bound_ok"]
    assert f"at least {models_cpu.TARGETS['over_evit']}" in C["over_evit_ok"]
    assert f"at least {models_cpu.TARGETS['batch1_deit_s']}x" in C["batch1_ok"]
    assert f"at least {models_cpu.TARGETS['deit_s_b16']}x" in C["deit_s_b16_ok"]
    assert f"at least {vlm.TARGETS['ttft_bound_fraction']:g} at {vlm.TARGET_TOKENS} tokens" in C["ttft_bound_ok"]


def test_performance_doc_holds_the_legend():
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    start = "<!-- bench columns: generated from pruneattn/bench/legend.py, checked by tests/test_bench_legend.py -->"
    assert start in text, "docs/performance.md needs the legend (pruneattn.bench.legend.markdown_legend())"
    table = text.split(start, 1)[1].split("<!-- end of bench columns -->", 1)[0].strip()
    assert table == legend.markdown_legend()


def test_smoke_run_explains_every_column_it_prints(tmp_path):
    """Every CPU suite and both vision-language suites, tiny shapes: each printed and written table's columns
    are explained in what is printed and in the Markdown file beside it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    args = ["--smoke", "--no-progress", "--threads", "1", "--out", str(tmp_path), "--cpu-ops", "--cpu-models",
            "--cpu-families", "--vlm", "--vlm-qwen"]
    res = subprocess.run([sys.executable, "-m", "pruneattn.cli", "bench", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    outputs = {"printed": res.stdout, **{p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.md")}}
    assert len(outputs) == 6, sorted(outputs)
    for name, text in outputs.items():
        tables = table_columns(text)
        assert tables, name
        unexplained = sorted({c for cols in tables for c in cols if not explained(text, c)})
        assert not unexplained, (name, unexplained)
