"""What each column of ``pruneattn bench``'s tables holds: printed under every table, and in docs/performance.md.

:data:`COLUMNS` is the one list; :func:`legend` writes the lines for the columns a table shows and
:func:`markdown_legend` the whole list as a Markdown table (``tests/test_bench_legend.py`` checks that every
column a suite prints is here and that docs/performance.md holds the table).
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["COLUMNS", "legend", "markdown_legend", "missing"]

_SPEEDUP = "speed-up over the unpatched model in the same run: its median time / this row's"
_OK = "True when the target is met (a smoke run leaves the timing verdicts out)"

COLUMNS: dict[str, str] = {
    # what a row is
    "suite": "which part of the suite the row belongs to (attention+scores, selection+gather, forward+backward, "
             "models, models train step)",
    "model": "the model: a timm name, hf:<name> for a Hugging Face model, or the vision-language model's shape",
    "config": "unpatched; pruneattn <stat> <keep rate> <mode> (pruneattn.patch); EViT-style eager (the same pruning "
              "with eager attention in its pruning blocks, as EViT's code computes it); for the vision-language "
              "models, pruneattn or the eager baseline at the number of image tokens kept",
    "candidate": "what is timed: sdpa (PyTorch's scaled_dot_product_attention alone, the output without scores), "
                 "pruneattn's op with its query and statistic (cls / mean, var / mad / mean), the eager path (the "
                 "N x N softmax matrix, then the scores), or the selection / backward variants named",
    "dtype": "data type of the inputs",
    "B": "batch size (images)",
    "H": "attention heads",
    "N": "tokens per image, prefix tokens included",
    "img_size": "image side in pixels",
    "batch": "images per call",
    "images": "the image sizes of the batch (height x width, pixels)",
    "shape": "(B, H, N, d) of q, k and v",
    # times
    "median_ms": "median wall time of one call over the interleaved repeats (ms)",
    "q1_ms": "first quartile of those times (ms)",
    "q3_ms": "third quartile of those times (ms)",
    "images_per_s": "images per second: batch / median time",
    "x_sdpa": "median time / SDPA alone's median time in the same run (below 1: faster than SDPA alone)",
    "ratio": "median time / its group's baseline in the same run (attention+scores: SDPA alone; selection+gather: "
             "torch topk+sort+gather; forward+backward: SDPA's forward and backward)",
    "roof": "fraction of the H100 roofline bound reached (time of the bound / measured time; H100 rows only)",
    # speed-ups and bounds
    "speedup": _SPEEDUP,
    "flop_bound": "speed-up a model whose time follows its FLOPs would reach: FLOPs of the unpatched model / "
                  "FLOPs of this configuration, every block counted with the tokens it sees",
    "bound_fraction": "speed-up / FLOP-count bound (1.0: the bound is reached; above 1: faster than FLOPs alone "
                      "explain)",
    "block_time_bound": "speed-up if every block took the unpatched block's measured time at the token counts it "
                        "sees (the FLOP bound corrected for how matrix products slow down at small sizes); the gap "
                        "to the measured speed-up is the cost of pruning itself",
    "over_evit": "the EViT-style eager configuration's median time / this row's (above 1: faster than EViT-style)",
    "ttft_ms": "time to first token: median wall time from the generate call (the tower included) to the first "
               "token's logits (ms)",
    "ttft_q1_ms": "first quartile of the time to first token (ms)",
    "ttft_q3_ms": "third quartile of the time to first token (ms)",
    "ttft_speedup": "unpatched model's time to first token / this row's",
    "ttft_flop_bound": "FLOP-count bound of the time to first token: matmul FLOPs of the unpatched prefill (tower "
                       "and language model) / this configuration's",
    "over_eager": "the eager baseline's time to first token at the same token count / this row's (above 1: faster)",
    "ttft_cpu_s": "the time to first token in CPU seconds of the process (all threads): unlike the wall clock, not "
                  "stretched when other work deschedules a thread",
    "bound_fraction_cpu": "bound_fraction computed from CPU time (ttft_cpu_s)",
    "over_eager_cpu": "over_eager computed from CPU time (ttft_cpu_s)",
    "decode_ms_per_step": "median wall time of one decode step after the first token (ms)",
    "decode_tok_s": "new tokens per second while decoding: batch / decode step time",
    "decode_speedup": "unpatched model's decode step time / this row's",
    "decode_flop_bound": "FLOP-count bound of a decode step: matmul FLOPs of the unpatched step / this "
                         "configuration's",
    "prompt_tokens_to_lm": "tokens of each prompt that the language model reads (image tokens and text)",
    "image_tokens_to_lm": "image tokens the language model reads, the whole batch together",
    "same_kept_as_eager": "agreement with the eager baseline at the same token count: the share of kept patches "
                          "both keep (LLaVA / PaliGemma), or whether both keep the same units (Qwen2.5-VL)",
    # memory
    "alloc_peak_mb": "peak bytes held by torch's CPU allocator during one forward, above what was held before it "
                     "(MB; deterministic)",
    "unpatched_alloc_peak_mb": "alloc_peak_mb of the unpatched model",
    "forward_peak_mb": "resident-set peak of the forwards in a fresh process, above its size before them (MB; "
                       "page-level, noisy by a few MB)",
    "rss_forward_peak_mb": "forward_peak_mb of this configuration",
    "unpatched_rss_forward_peak_mb": "forward_peak_mb of the unpatched model",
    "peak_mem_mb": "peak bytes allocated on the GPU during one forward, above what was allocated before it (MB)",
    "peak_mb": "peak bytes held by torch's allocator (CPU) or allocated on the GPU, above the weights, during a "
               "generate of 2 new tokens: the prefill and one decode step (MB)",
    "eager_peak_mb": "peak_mb of the eager baseline at the same token count",
    "unpatched_peak_mb": "peak_mb of the unpatched model",
    # the CPU op checks
    "cls_over_sdpa": "query=\"cls\" op's median time / SDPA alone's (target: at most 1.15)",
    "mean_over_sdpa": "query=\"mean\" op's median time / SDPA alone's (target: at most 2.5)",
    "eager_over_cls": "eager path's median time / the query=\"cls\" op's (target at N = 577: at least 2)",
    "mean_largest_temp": "shape of the largest tensor any torch op makes on the CPU path for query=\"mean\" (every "
                         "op recorded)",
    "one_chunk_numel": "elements of one query chunk of attention weights (B x H x chunk x N), the bound that "
                       "largest tensor must stay within",
    "mean_temporary_ok": "True when that largest tensor is no larger than one query chunk or the output",
    # verdicts
    "cls_ok": _OK + ": cls_over_sdpa",
    "mean_ok": _OK + ": mean_over_sdpa",
    "eager_ok": _OK + ": eager_over_cls",
    "bound_ok": _OK + ": bound_fraction at least 0.95",
    "over_evit_ok": _OK + ": over_evit at least 1.15",
    "memory_ok": _OK + ": alloc_peak_mb no higher than the unpatched model's",
    "batch1_ok": _OK + ": DeiT-S at batch 1 at least 1.3x faster than unpatched",
    "deit_s_b16_ok": _OK + ": DeiT-S at batch 16 at least 1.4x faster than unpatched",
    "ttft_bound_ok": _OK + ": bound_fraction of the time to first token at least 0.9 at 64 tokens",
    "over_eager_ok": _OK + ": time to first token below the eager baseline's",
    "below_eager_peak_ok": _OK + ": peak_mb below the eager baseline's",
    "below_unpatched_peak_ok": _OK + ": peak_mb below the unpatched model's",
    # the vision-language summary and model tables
    "target": "the target judged",
    "met": "in how many settings the target is met",
    "missed": "the settings that miss it",
    "met_on_cpu_time": "the same, judged on CPU time",
    "missed_on_cpu_time": "the settings that miss it on CPU time",
    "tower_M": "parameters of the vision tower (millions)",
    "projector_M": "parameters of the projector (millions)",
    "language_model_M": "parameters of the language model (millions)",
    "total_M": "parameters in all (millions)",
    "placeholders": "image tokens per image in the unpatched prompt",
    "text_tokens": "text tokens per prompt",
    "q_scale": "factor on the tower's q projections, so that random weights give attention that differs between "
               "patches",
}


def missing(columns: Iterable[str]) -> list[str]:
    """The columns that :data:`COLUMNS` does not explain."""
    return [c for c in columns if c not in COLUMNS]


def legend(columns: Iterable[str]) -> str:
    """``columns:`` and one aligned line per column shown (name, what it holds), for the terminal."""
    shown = list(dict.fromkeys(columns))
    if not shown:
        return ""
    width = max(len(c) for c in shown)
    lines = ["columns:"] + [f"  {c:<{width}}  {COLUMNS.get(c, '')}".rstrip() for c in shown]
    return "\n".join(lines)


def markdown_legend(columns: Iterable[str] | None = None) -> str:
    """A Markdown table of ``columns`` (default: every column) and what each holds."""
    shown = list(dict.fromkeys(COLUMNS if columns is None else columns))
    return "\n".join(["| column | what it holds |", "|---|---|"] + [f"| `{c}` | {COLUMNS[c]} |" for c in shown])
