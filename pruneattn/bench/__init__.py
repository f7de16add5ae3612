"""``pruneattn bench`` (also ``python -m pruneattn.bench``): benchmarks of the kernels, the CPU path and models.

    pruneattn bench --cpu-ops            CPU path vs SDPA alone vs eager attention, with the speed targets
    pruneattn bench --cpu-models         DeiT-S / ViT-S-384 on the CPU, with the speed targets
    pruneattn bench --cpu-families       DINOv3-S/16 and SigLIP2-B/16 NaFlex (a batch of images of
                                         different sizes) on the CPU, with the same targets
    pruneattn bench --ops                op-level suite (GPU: bf16 + fp16, all standard shapes)
    pruneattn bench --models             model-level suite (GPU: DeiT-T/S/B 224, ViT-B/16 384)
    pruneattn bench --vlm                LLaVA-1.5- and PaliGemma-224-shaped models: time to first token,
                                         decode, peak memory vs unpatched and an eager (VisionZip-style)
                                         baseline, with FLOP-count bounds (long on a CPU: about 50 min on 2 cores)
    pruneattn bench --vlm-qwen           a Qwen2.5-VL-shaped model (images of 448 x 448 and 672 x 448):
                                         the same metrics at 25% and 12.5% of the merged tokens, vs an
                                         eager last block (a CPU: about 30 min)
    pruneattn bench --vlm-qwen3          the same for a Qwen3-VL-2B-shaped model (DeepStack; images of
                                         448 x 448 and 896 x 672)
    pruneattn bench --vlm-internvl       an InternVL3-1B-shaped model (one image of two 448 px tiles,
                                         batch 1 and 4): the same metrics at 25% and 12.5% of each
                                         tile's units (a CPU: about 25 min)
    pruneattn bench                      everything that fits the machine: --ops --models on a GPU,
                                         --cpu-ops --cpu-models on a CPU

``--out DIR`` writes ``<suite>.json`` (every number with device, versions, dtype, shapes, date),
``<suite>.md`` and ``<suite>.png`` into DIR; a table is printed either way, followed by what each of its
columns holds (docs/performance.md lists every column). ``--smoke`` runs tiny
shapes once and skips the peak-memory subprocesses (seconds: what CI runs); its outputs say so and judge
no target. Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import os
import sys

from pruneattn.cli import HelpFormatter

__all__ = ["main"]

_SUITES = ("cpu-ops", "cpu-models", "cpu-families", "ops", "models", "vlm", "vlm-qwen", "vlm-qwen3", "vlm-internvl")
SMOKE_NOTE = ("SMOKE RUN: tiny shapes, one repeat, no warm-up; the timings only show that the suite runs "
              "and mean nothing; no speed target is judged")
# Verdicts that rest on timings: a smoke run leaves them out (structural checks such as the size of the
# largest temporary stay).
TIMING_VERDICTS = frozenset({"cls_ok", "mean_ok", "bound_ok", "over_evit_ok", "batch1_ok", "deit_s_b16_ok", "memory_ok",
                             "ttft_bound_ok", "over_eager_ok", "below_eager_peak_ok", "below_unpatched_peak_ok",
                             "ttft_bound_cpu_ok"})


# The columns of each suite's printed table (every one explained in pruneattn/bench/legend.py).
CPU_OPS_COLUMNS = ["B", "H", "N", "candidate", "median_ms", "q1_ms", "q3_ms", "x_sdpa"]
CPU_MODELS_COLUMNS = ["model", "img_size", "batch", "config", "median_ms", "images_per_s", "speedup", "flop_bound",
                      "bound_fraction", "block_time_bound", "over_evit", "alloc_peak_mb", "forward_peak_mb"]
OPS_COLUMNS = ["suite", "dtype", "B", "H", "N", "candidate", "median_ms", "ratio", "roof"]
MODELS_COLUMNS = ["suite", "model", "batch", "config", "median_ms", "images_per_s", "speedup", "flop_bound",
                  "over_evit", "peak_mem_mb"]
VLM_COLUMNS = ["model", "batch", "config", "prompt_tokens_to_lm", "ttft_ms", "ttft_q1_ms", "ttft_q3_ms",
               "ttft_speedup", "ttft_flop_bound", "bound_fraction", "over_eager", "ttft_cpu_s",
               "bound_fraction_cpu", "over_eager_cpu", "decode_ms_per_step", "decode_tok_s", "decode_speedup",
               "decode_flop_bound", "peak_mb", "same_kept_as_eager"]
VLM_SUMMARY_COLUMNS = ["target", "met", "missed", "met_on_cpu_time", "missed_on_cpu_time"]
VLM_MODEL_COLUMNS = ["model", "tower_M", "projector_M", "language_model_M", "total_M", "placeholders", "text_tokens",
                     "q_scale"]
VLM_QWEN_COLUMNS = ["batch", "images", "config", "image_tokens_to_lm", "ttft_ms", "ttft_q1_ms", "ttft_q3_ms",
                    "ttft_speedup", "ttft_flop_bound", "bound_fraction", "ttft_cpu_s", "bound_fraction_cpu",
                    "decode_ms_per_step", "decode_tok_s", "decode_speedup", "decode_flop_bound", "peak_mb",
                    "same_kept_as_eager"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pruneattn bench", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    for s in _SUITES:
        p.add_argument(f"--{s}", action="store_true", help=f"run the {s} suite")
    p.add_argument("--out", default=None, help="folder for JSON, Markdown and PNG results (default: print only)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat (seconds; for CI)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for the CPU suites")
    p.add_argument("--reps", type=int, default=None, help="timing repeats for the CPU suites and vlm (default: 15 for cpu-ops, 9 for cpu-models, 3 for vlm "
                   "on a CPU and 10 on a GPU, 1 with --smoke)")
    p.add_argument("--no-memory", action="store_true", help="cpu-models: skip the peak-memory subprocesses; vlm: "
                   "skip the peak-memory runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _write(out_dir: str | None, stem: str, result: dict, md: str, plot_fn=None) -> None:
    from pruneattn.bench.report import write_json

    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"{stem}.json"), result)
    with open(os.path.join(out_dir, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(md)
    made = plot_fn(result["rows"], os.path.join(out_dir, f"{stem}.png")) if plot_fn else False
    print(f"wrote {out_dir}/{stem}.json, {stem}.md" + (f", {stem}.png" if made else ""))


def _env_line(env: dict, end_load: float | None = None) -> str:
    load = f"{env['load_average_1min']}" + (f" at start, {end_load} at end" if end_load is not None else "")
    return (f"device: {env['device']}; torch {env['torch']}; triton {env['triton']}; threads {env['threads']}; "
            f"date {env['date']}; 1-min load average {load}")


def _mark_smoke(res: dict) -> dict:
    """A smoke run's result: says so, and carries no target checks."""
    res["smoke"] = True
    res["note"] = SMOKE_NOTE
    res["checks"] = [{k: v for k, v in c.items() if k not in TIMING_VERDICTS} for c in res.get("checks", [])]
    for r in res.get("rows", []):
        r["smoke"] = True
    return res


def _section(title: str, env: dict, rows: list[dict], columns: list[str], extra: str = "",
             end_load: float | None = None, smoke: bool = False) -> tuple[str, str]:
    from pruneattn.bench.legend import legend
    from pruneattn.bench.report import markdown_table, text_table

    cols = [c for c in columns if any(c in r for r in rows)]
    line = _env_line(env, end_load)
    if smoke:
        title = f"{title} (smoke run)"
        line = f"{SMOKE_NOTE}\n\n{line}"
    md = f"# {title}\n\n{line}\n\n{markdown_table(rows, cols)}\n\n{_md_legend(cols)}\n{extra}"
    txt = f"== {title}\n{line}\n{text_table(rows, cols)}\n{legend(cols)}\n{extra}"
    return md, txt


def _md_legend(columns: list[str]) -> str:
    """The Markdown legend of a table's columns: one bullet per column."""
    from pruneattn.bench.legend import COLUMNS

    return "Columns:\n\n" + "\n".join(f"- `{c}`: {COLUMNS.get(c, '')}" for c in columns) + "\n"


def _table_md(rows: list[dict], columns: list[str], explained: list[str] | tuple[str, ...] = ()) -> str:
    """A Markdown table and the legend of its columns (those not in ``explained``, which a table above has)."""
    from pruneattn.bench.report import markdown_table

    new = [c for c in columns if c not in explained]
    return markdown_table(rows, columns) + "\n\n" + (_md_legend(new) if new else "")


def _checks_md(checks: list[dict], smoke: bool = False, explained: list[str] | tuple[str, ...] = ()) -> str:
    """The targets table (a smoke run: the measured values alone), with the legend of its new columns."""
    if not checks:
        return ""
    cols = list(dict.fromkeys(k for c in checks for k in c if not isinstance(c[k], dict)))
    title = "Measured values (smoke run: no speed target judged)" if smoke else "Targets"
    return f"\n## {title}\n\n" + _table_md(checks, cols, explained)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    progress = not args.no_progress
    chosen = [s for s in _SUITES if getattr(args, s.replace("-", "_"))]
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not chosen:
        chosen = ["ops", "models"] if device.type == "cuda" else ["cpu-ops", "cpu-models"]
    if "cpu-ops" in chosen:
        from pruneattn.bench import cpu_ops
        from pruneattn.bench.ops_suite import plot

        res = cpu_ops.run_cpu_ops(cpu_ops.SMOKE_SHAPES if args.smoke else cpu_ops.SHAPES, reps=args.reps or 15,
                                  smoke=args.smoke, threads=args.threads, progress=progress)
        if args.smoke:
            _mark_smoke(res)
        extra = _checks_md([{k: v for k, v in c.items() if k != "mean_largest_temporary"} | {
            "mean_largest_temp": str(c["mean_largest_temporary"]["largest_shape"]),
            "one_chunk_numel": c["mean_largest_temporary"]["one_query_chunk_numel"]} for c in res["checks"]], args.smoke,
            CPU_OPS_COLUMNS)
        extra += ("\nop layer overhead (microseconds per call on a tiny input; op: the public function, custom op only: "
                  "torch.ops.pruneattn.attention_stats called directly, cpu path: the CPU implementation alone): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in res["op_overhead_us"].items()) + "\n")
        md, txt = _section("CPU attention + scores vs SDPA alone vs eager", res["environment"], res["rows"],
                           CPU_OPS_COLUMNS, extra,
                           res["load_average_end"], smoke=args.smoke)
        print(txt)
        _write(args.out, "cpu_ops", res, md, plot)
    for suite, stem in (("cpu-models", "cpu_models"), ("cpu-families", "cpu_families")):
        if suite not in chosen:
            continue
        from pruneattn.bench import models_cpu

        cases = {"cpu-models": (models_cpu.SMOKE_CASES, models_cpu.CASES),
                 "cpu-families": (models_cpu.FAMILY_SMOKE_CASES, models_cpu.FAMILY_CASES)}[suite][0 if args.smoke else 1]
        res = models_cpu.run_models_cpu(cases, reps=args.reps or 9, smoke=args.smoke, threads=args.threads,
                                        memory=not (args.no_memory or args.smoke), progress=progress)
        if args.smoke:
            _mark_smoke(res)
        md, txt = _section("CPU models: unpatched vs pruneattn vs EViT-style eager", res["environment"], res["rows"],
                           CPU_MODELS_COLUMNS, _checks_md(res["checks"], args.smoke, CPU_MODELS_COLUMNS),
                           res["load_average_end"], smoke=args.smoke)
        print(txt)
        _write(args.out, stem, res, md, models_cpu.plot)
    if "ops" in chosen:
        from pruneattn.bench import ops_suite

        res = ops_suite.run_ops(device, smoke=args.smoke, progress=progress)
        if args.smoke:
            _mark_smoke(res)
        md, txt = _section("Op-level suite", res["environment"], ops_suite.summary(res["rows"]),
                           OPS_COLUMNS, smoke=args.smoke)
        print(txt)
        _write(args.out, "ops", res, md, ops_suite.plot)
        if args.out and res["choices"]:
            from pruneattn.bench.report import write_json

            write_json(os.path.join(args.out, "choices.json"), {"environment": res["environment"], "choices": res["choices"]})
            print(f"wrote {args.out}/choices.json (PRUNEATTN_CHOICES={args.out}/choices.json uses it)")
    if "models" in chosen:
        from pruneattn.bench import models_gpu

        cases = models_gpu.SMOKE_CASES if args.smoke else models_gpu.CASES
        configs = models_gpu.SMOKE_CONFIGS if args.smoke else models_gpu.CONFIGS
        res = models_gpu.run_models_gpu(device, cases, configs, smoke=args.smoke, batch1=not args.smoke, progress=progress)
        if args.smoke:
            _mark_smoke(res)
        md, txt = _section("Model-level suite", res["environment"], res["rows"],
                           MODELS_COLUMNS, smoke=args.smoke)
        print(txt)
        _write(args.out, "models", res, md, models_gpu.plot)
    if "vlm" in chosen:
        _run_vlm(args, device, progress)
    for flag in _RATE_SUITES:
        if flag in chosen:
            _run_rates(args, device, progress, flag)
    return 0


# The keep-rate suites: flag -> (module, suite) in pruneattn/bench/.
_RATE_SUITES = {"vlm-qwen": ("vlm_qwen", "QWEN25"), "vlm-qwen3": ("vlm_qwen3", "QWEN3"),
                "vlm-internvl": ("vlm_internvl", "INTERNVL")}


def _run_rates(args: argparse.Namespace, device, progress: bool, flag: str) -> None:
    """One of the keep-rate suites (``--vlm-qwen``, ``--vlm-qwen3``, ``--vlm-internvl``)."""
    import importlib

    from pruneattn.bench import vlm_qwen

    module, name = _RATE_SUITES[flag]
    suite = getattr(importlib.import_module(f"pruneattn.bench.{module}"), name)
    if device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and not args.smoke:
        print("note: OMP_WAIT_POLICY is not PASSIVE; on a shared CPU set it before starting (see benchmarks/NOTES.md)")
    res = vlm_qwen.run_rates(suite, device, reps=args.reps, threads=args.threads, memory=not args.no_memory,
                                progress=progress, smoke=args.smoke)
    res["checks"] = vlm_qwen.checks(res["rows"])
    if args.smoke:
        _mark_smoke(res)
    st = res["settings"]
    peak = ("`torch.cuda.max_memory_allocated`" if device.type == "cuda" else "peak bytes held by torch's CPU "
            "allocator")
    threads = f", {st['threads']} threads" if st["threads"] else ""
    model = "Model (smoke run: widths of 64 in place of the widths named here)" if args.smoke else "Model"
    extra = (f"\n{model}: {suite.describe(st)}; {st['dtype']}{threads}, pruneattn's {st['backend']} backend. TTFT: "
             f"median (q1, q3) of {st['ttft_reps']} interleaved `generate` calls, the tower included. Decode: the "
             f"steps of {st['decode_reps']} call(s) that generate {st['new_tokens']} tokens. Peak memory (`peak_mb`): "
             f"{peak} above the weights, during a {st['memory_run']}. Bounds: matmul FLOPs of the prefill (tower + "
             "language model) and of a decode step, unpatched over the configuration "
             f"(`{suite.build.__module__.replace('.', '/')}.py`). `eager last block`: the same "
             "pruning with the scoring attention built from the N x N weights; `same_kept_as_eager`: both keep the "
             "same units. `ttft_cpu_s` / `bound_fraction_cpu` (CPU runs): the same TTFT in CPU seconds of the process "
             "(both threads), which a thread descheduled by another process's work does not stretch.\n")
    extra += _checks_md(res["checks"], args.smoke)
    md, txt = _section(suite.title, res["environment"], res["rows"], VLM_QWEN_COLUMNS, extra,
                       res["load_average_end"], smoke=args.smoke)
    print(txt)
    _write(args.out, suite.stem, res, md, None)


def _run_vlm(args: argparse.Namespace, device, progress: bool) -> None:
    from pruneattn.bench import vlm, vlm_models

    if device.type == "cpu" and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" and not args.smoke:
        print("note: OMP_WAIT_POLICY is not PASSIVE; on a shared CPU set it before starting (see benchmarks/NOTES.md)")
    partial = os.path.join(args.out, "vlm.partial.json") if args.out else None
    if partial:
        os.makedirs(args.out, exist_ok=True)
    res = vlm.run_vlm(device, vlm_models.SMOKE_CASES if args.smoke else vlm_models.CASES, reps=args.reps,
                      smoke=args.smoke, threads=args.threads, memory=not args.no_memory, progress=progress,
                      checkpoint=partial)
    if args.smoke:
        _mark_smoke(res)
    st = res["settings"]
    reader = "`torch.cuda.max_memory_allocated`" if device.type == "cuda" else "peak bytes held by torch's CPU allocator"
    extra = (f"\nTTFT: median (q1, q3) of {st['ttft_reps']} interleaved repeats of `generate`, from the call (the tower "
             f"included) to the first token's logits. Decode: the steps of {st['decode_reps']} repeat(s) that generate "
             f"{st['new_tokens']} tokens (median ms per step; tok/s = batch / that). With fewer than 4 repeats q1 and q3 are "
             "the fastest and slowest. `ttft_cpu_s`: the same TTFT in CPU seconds of the process (both threads), with "
             "`bound_fraction_cpu` and `over_eager_cpu` from it: a thread that another process's work deschedules "
             "stops the wall clock's meaning, not the CPU time's. Peak memory (`peak_mb`): "
             f"{reader} above the weights, during a {st['memory_run']}. FLOP bounds: `pruneattn/bench/vlm_flops.py` (matmul FLOPs "
             "of the prefill / of a decode step, unpatched over the configuration). `same_kept_as_eager`: share of "
             "pruneattn drop's kept patches that the eager baseline keeps too (same images, same k).\n")
    extra += _checks_md(res["checks"], args.smoke, VLM_COLUMNS)
    if not args.smoke:
        extra += "\n## Summary of the targets\n\n" + _table_md(vlm.summary(res["checks"]), VLM_SUMMARY_COLUMNS)
    extra += "\n## Models\n\n" + _table_md(
        [{"model": m["model"], **{f"{k}_M": v / 1e6 for k, v in m["parameters"].items()},
          "placeholders": m["placeholders_per_image"], "text_tokens": m["text_tokens"], "q_scale": m["q_scale"]}
         for m in res["models"]],
        VLM_MODEL_COLUMNS, VLM_COLUMNS)
    md, txt = _section("Vision-language models: unpatched vs pruneattn vs eager baseline", res["environment"], res["rows"],
                       VLM_COLUMNS,
                       extra, res["load_average_end"], smoke=args.smoke)
    print(txt)
    _write(args.out, "vlm", res, md, vlm.plot)
    if partial and os.path.exists(partial):
        os.remove(partial)
